// The transform step in JavaScript: reshapes an order into an invoice.
//
// The same step as guest-examples/transform (Rust): the currency comes from
// the `currency` config value (default USD), `tax_percent` is optional.
// Built with componentize-js against the `step` world in wit/ (see
// docs/guests/javascript.md).
import { get } from "wasi:config/store@0.2.0-rc.1";
import { log } from "wasi:logging/logging@0.1.0-draft";

/** A `step-error` the host will not retry. */
function fatal(message) {
  return { tag: "fatal", val: message };
}

export function run(ctx, input) {
  let order;
  try {
    order = JSON.parse(input);
    const { first_name, last_name } = order.customer;
    order.billTo = `${first_name} ${last_name}`;
    if (!Array.isArray(order.items)) throw new TypeError("`items` is not a list");
  } catch (err) {
    throw fatal(`the input is not an order: ${err}`);
  }
  if (order.items.length === 0) {
    throw fatal(`order ${order.id} has no items`);
  }

  const currency = get("currency") ?? "USD";
  const taxText = get("tax_percent");
  let taxPercent = 0n;
  if (taxText !== undefined) {
    if (!/^[0-9]+$/.test(taxText)) {
      throw fatal(`the config value \`tax_percent\` = ${JSON.stringify(taxText)} is not a valid u64`);
    }
    taxPercent = BigInt(taxText);
  }

  // Cents are whole numbers: BigInt keeps them exact however large they get.
  const lines = order.items.map((item) => ({
    sku: item.sku,
    amount_cents: BigInt(item.quantity) * BigInt(item.unit_price_cents),
  }));
  const subtotal = lines.reduce((sum, line) => sum + line.amount_cents, 0n);
  const tax = (subtotal * taxPercent) / 100n;
  log("info", "transform", `invoice for ${order.id} in attempt ${ctx.attempt}`);
  const invoice = {
    invoice_for: order.id,
    bill_to: order.billTo,
    currency,
    lines,
    subtotal_cents: subtotal,
    tax_cents: tax,
    total_cents: subtotal + tax,
  };
  return JSON.stringify(invoice, (_, value) => (typeof value === "bigint" ? JSON.rawJSON(value.toString()) : value));
}
