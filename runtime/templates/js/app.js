// The __NAME__ step: {"name": "Ada"} -> {"greeting": "Hello, Ada!"}.
//
// The greeting word comes from the `greeting` config value, if the workflow
// sets one. Throw { tag: "retryable", val: "..." } for a failure worth
// another attempt, { tag: "fatal", val: "..." } for one that is not.
import { get } from "wasi:config/store@0.2.0-rc.1";
import { log } from "wasi:logging/logging@0.1.0-draft";

export function run(ctx, input) {
  const { name } = JSON.parse(input);
  if (typeof name !== "string" || name === "") {
    throw { tag: "fatal", val: "`name` must be a non-empty string" };
  }
  log("info", "__NAME__", `greeting ${name} (attempt ${ctx.attempt})`);
  const word = get("greeting") ?? "Hello";
  return JSON.stringify({ greeting: `${word}, ${name}!` });
}
