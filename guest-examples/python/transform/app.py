"""The transform step in Python: reshapes an order into an invoice.

The same step as guest-examples/transform (Rust): the currency comes from
the `currency` config value (default USD), `tax_percent` is optional.
Built with componentize-py against the `step` world in wit/ (see
docs/guests/python.md).
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import logging, wasi_config_store
from wit_world.imports.stepbox_step_types import StepContext, StepError_Fatal


def fatal(message: str) -> Err:
    return Err(StepError_Fatal(message))


class WitWorld(wit_world.WitWorld):
    def run(self, ctx: StepContext, input: str) -> str:
        try:
            order = json.loads(input)
            order_id = order["id"]
            customer = order["customer"]
            bill_to = f"{customer['first_name']} {customer['last_name']}"
            items = order["items"]
        except (ValueError, KeyError, TypeError) as err:
            raise fatal(f"the input is not an order: {err!r}")
        if not items:
            raise fatal(f"order {order_id} has no items")

        currency = wasi_config_store.get("currency") or "USD"
        tax_text = wasi_config_store.get("tax_percent")
        if tax_text is None:
            tax_percent = 0
        elif tax_text.isdigit():
            tax_percent = int(tax_text)
        else:
            raise fatal(f"the config value `tax_percent` = {json.dumps(tax_text)} is not a valid u64")

        lines = [
            {"sku": item["sku"], "amount_cents": item["quantity"] * item["unit_price_cents"]}
            for item in items
        ]
        subtotal = sum(line["amount_cents"] for line in lines)
        tax = subtotal * tax_percent // 100
        logging.log(logging.Level.INFO, "transform", f"invoice for {order_id} in attempt {ctx.attempt}")
        return json.dumps(
            {
                "invoice_for": order_id,
                "bill_to": bill_to,
                "currency": currency,
                "lines": lines,
                "subtotal_cents": subtotal,
                "tax_cents": tax,
                "total_cents": subtotal + tax,
            }
        )
