//! Reshapes an order into an invoice. The currency comes from the `currency`
//! config value (default USD); a `tax_percent` config value is optional.
use serde::{Deserialize, Serialize};
use stepbox_sdk::{StepError, config, step};

#[derive(Deserialize)]
struct Order {
    id: String,
    customer: Customer,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Customer {
    first_name: String,
    last_name: String,
}

#[derive(Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
    unit_price_cents: u64,
}

#[derive(Serialize)]
struct Invoice {
    invoice_for: String,
    bill_to: String,
    currency: String,
    lines: Vec<Line>,
    subtotal_cents: u64,
    tax_cents: u64,
    total_cents: u64,
}

#[derive(Serialize)]
struct Line {
    sku: String,
    amount_cents: u64,
}

#[step]
fn run(order: Order) -> Result<Invoice, StepError> {
    if order.items.is_empty() {
        return Err(StepError::fatal(format!("order {} has no items", order.id)));
    }
    let currency = config::get("currency")?.unwrap_or_else(|| "USD".to_owned());
    let tax_percent: u64 = config::get_parsed("tax_percent")?.unwrap_or(0);
    let lines: Vec<Line> = order
        .items
        .into_iter()
        .map(|item| Line { amount_cents: u64::from(item.quantity) * item.unit_price_cents, sku: item.sku })
        .collect();
    let subtotal_cents = lines.iter().map(|line| line.amount_cents).sum::<u64>();
    let tax_cents = subtotal_cents * tax_percent / 100;
    Ok(Invoice {
        invoice_for: order.id,
        bill_to: format!("{} {}", order.customer.first_name, order.customer.last_name),
        currency,
        lines,
        subtotal_cents,
        tax_cents,
        total_cents: subtotal_cents + tax_cents,
    })
}
