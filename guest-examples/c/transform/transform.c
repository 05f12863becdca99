/* The transform step in C: reshapes an order into an invoice.
 *
 * The same step as guest-examples/transform (Rust): the currency comes from
 * the `currency` config value (default USD), `tax_percent` is optional.
 * Built with clang and wasi-libc against the bindings `wit-bindgen c`
 * generates from wit/ (world `step`), then wrapped as a component with the
 * WASI preview1 adapter; see docs/guests/c.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "step.h"

/* Sets `err` to a fatal step-error with the formatted message. */
static bool fatal(step_step_error_t *err, const char *message) {
    err->tag = STEPBOX_STEP_TYPES_STEP_ERROR_FATAL;
    step_string_dup(&err->val.fatal, message);
    return false;
}

/* A config value as a C string (NULL when unset); false if the host failed. */
static bool config(const char *key, char **value) {
    step_string_t name;
    step_option_string_t found;
    wasi_config_store_error_t error;
    step_string_set(&name, key);
    *value = NULL;
    if (!wasi_config_store_get(&name, &found, &error)) {
        wasi_config_store_error_free(&error);
        return false;
    }
    if (found.is_some) {
        *value = strndup((const char *)found.val.ptr, found.val.len);
        step_string_free(&found.val);
    }
    return true;
}

static void log_info(const char *message) {
    step_string_t context, text;
    step_string_set(&context, "transform");
    step_string_set(&text, message);
    wasi_logging_logging_log(WASI_LOGGING_LOGGING_LEVEL_INFO, &context, &text);
}

static bool transform(const json_value *order, step_string_t *ret, step_step_error_t *err) {
    char message[256];
    const json_value *id = json_get(order, "id");
    const json_value *customer = json_get(order, "customer");
    const json_value *first = json_get(customer, "first_name");
    const json_value *last = json_get(customer, "last_name");
    const json_value *items = json_get(order, "items");
    if (!id || id->kind != JSON_STRING || !first || first->kind != JSON_STRING || !last ||
        last->kind != JSON_STRING || !items || items->kind != JSON_ARRAY) {
        return fatal(err, "the input is not an order: it needs `id`, `customer.first_name`, "
                          "`customer.last_name` (strings) and `items` (a list)");
    }
    if (items->count == 0) {
        snprintf(message, sizeof message, "order %s has no items", id->text);
        return fatal(err, message);
    }

    char *currency, *tax_text;
    if (!config("currency", &currency) || !config("tax_percent", &tax_text)) {
        return fatal(err, "cannot read the step's config");
    }
    uint64_t tax_percent = 0;
    if (tax_text) {
        json_value number = {.kind = JSON_NUMBER, .text = tax_text, .len = strlen(tax_text)};
        if (!json_u64(&number, &tax_percent)) {
            snprintf(message, sizeof message, "the config value `tax_percent` = \"%.64s\" is not a valid u64", tax_text);
            free(tax_text);
            free(currency);
            return fatal(err, message);
        }
        free(tax_text);
    }

    json_buf out = {0};
    json_raw(&out, "{\"invoice_for\":");
    json_string(&out, id->text, id->len);
    json_raw(&out, ",\"bill_to\":");
    size_t name_len = first->len + 1 + last->len;
    char *name = malloc(name_len + 1);
    if (!name) {
        free(currency);
        return fatal(err, "out of memory");
    }
    snprintf(name, name_len + 1, "%s %s", first->text, last->text);
    json_string(&out, name, name_len);
    free(name);
    json_raw(&out, ",\"currency\":");
    json_string(&out, currency ? currency : "USD", strlen(currency ? currency : "USD"));
    free(currency);
    json_raw(&out, ",\"lines\":[");
    uint64_t subtotal = 0;
    for (size_t i = 0; i < items->count; i++) {
        const json_value *item = items->items[i];
        const json_value *sku = json_get(item, "sku");
        uint64_t quantity, unit_price;
        if (!sku || sku->kind != JSON_STRING || !json_u64(json_get(item, "quantity"), &quantity) ||
            !json_u64(json_get(item, "unit_price_cents"), &unit_price)) {
            free(out.data);
            snprintf(message, sizeof message, "item %zu needs `sku` and whole-number `quantity` and `unit_price_cents`", i);
            return fatal(err, message);
        }
        uint64_t amount = quantity * unit_price;
        subtotal += amount;
        json_raw(&out, i == 0 ? "{\"sku\":" : ",{\"sku\":");
        json_string(&out, sku->text, sku->len);
        json_raw(&out, ",\"amount_cents\":");
        json_u64_out(&out, amount);
        json_raw(&out, "}");
    }
    uint64_t tax = subtotal * tax_percent / 100;
    json_raw(&out, "],\"subtotal_cents\":");
    json_u64_out(&out, subtotal);
    json_raw(&out, ",\"tax_cents\":");
    json_u64_out(&out, tax);
    json_raw(&out, ",\"total_cents\":");
    json_u64_out(&out, subtotal + tax);
    json_raw(&out, "}");
    if (out.failed) {
        free(out.data);
        return fatal(err, "out of memory");
    }
    snprintf(message, sizeof message, "invoice for %s", id->text);
    log_info(message);
    /* The bindings free the returned string after the call. */
    ret->ptr = (uint8_t *)out.data;
    ret->len = out.len;
    return true;
}

bool exports_step_run(step_step_context_t *ctx, step_string_t *input, step_string_t *ret, step_step_error_t *err) {
    char error[128];
    json_value *order = json_parse((const char *)input->ptr, input->len, error, sizeof error);
    bool ok;
    if (order) {
        ok = transform(order, ret, err);
        json_free(order);
    } else {
        char message[192];
        snprintf(message, sizeof message, "the input is not JSON: %s", error);
        ok = fatal(err, message);
    }
    step_string_free(input);
    stepbox_step_types_step_context_free(ctx);
    return ok;
}
