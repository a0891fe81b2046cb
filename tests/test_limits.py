"""A pass's memory is bounded (limits.pass_memory): over it the pass dies, is retried, and status says why."""
import unittest

from tests.util import HAVE_NODE, TempHome

HOG = {
    "node": """
async function workflow(input, { step }) {
  return await step("hog", () => { const a = []; for (;;) a.push(new Array(1e6).fill(1)); });
}
""",
    "python": """
def workflow(input, ctx):
    def hog():
        a = []
        while True:
            a.append(bytearray(50 * 1024 * 1024))
    return ctx.step("hog", hog)
""",
}


class PassMemory(TempHome):
    extra_config = "limits:\n  pass_memory: 256MiB\n"

    def check(self, runtime):
        sc = self.sidecar()
        sc.deploy("hog", HOG[runtime], runtime=runtime)
        run_id = sc.start("hog", {}, drive=False)["id"]
        sc.tick()
        st = sc.status(run_id)
        self.assertNotEqual(st["status"], "completed", st)
        step = st["steps"][0]
        self.assertEqual(step["status"], "failed", st)
        text = (st.get("last_pass") or {}).get("reason", "") + " " + step["error"]["message"]
        self.assertIn("memory", text.lower(), st)

    @unittest.skipUnless(HAVE_NODE, "node is not installed")
    def test_node_pass_over_its_memory_is_stopped(self):
        self.check("node")

    def test_python_pass_over_its_memory_is_stopped(self):
        self.check("python")


if __name__ == "__main__":
    unittest.main()
