# The Quick Start workflow in Python: ctx.sleep takes seconds (or "5s", "5m").
def workflow(input, ctx):
    greeting = ctx.step("greet", lambda: "Hello, %s!" % input["name"])

    ctx.sleep("wait", 5)

    return ctx.step("complete", lambda: {"message": greeting})
