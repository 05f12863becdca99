"""The __NAME__ step: {"name": "Ada"} -> {"greeting": "Hello, Ada!"}.

The greeting word comes from the `greeting` config value, if the workflow
sets one. Raise Err(StepError_Retryable(...)) for a failure worth another
attempt, Err(StepError_Fatal(...)) for one that is not.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import logging, wasi_config_store
from wit_world.imports.stepbox_step_types import StepContext, StepError_Fatal


class WitWorld(wit_world.WitWorld):
    def run(self, ctx: StepContext, input: str) -> str:
        name = json.loads(input).get("name")
        if not isinstance(name, str) or not name:
            raise Err(StepError_Fatal("`name` must be a non-empty string"))
        logging.log(logging.Level.INFO, "__NAME__", f"greeting {name} (attempt {ctx.attempt})")
        word = wasi_config_store.get("greeting") or "Hello"
        return json.dumps({"greeting": f"{word}, {name}!"})
