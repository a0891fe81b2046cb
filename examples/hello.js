// The seed README's Quick Start workflow.
async function workflow(input, { step, sleep }) {
  const greeting = await step("greet", () => {
    return `Hello, ${input.name}!`;
  });

  await sleep("wait", 5000);

  const result = await step("complete", () => {
    return { message: greeting, timestamp: Date.now() };
  });

  return result;
}
