/* The transform step in C: reshapes an order into an invoice.
 *
 * The same step as guest-examples/transform (Rust): the currency comes from
 * the `currency` config value (default USD), `tax_percent` is optional.
 * Built with clang and wasi-libc against the bindings `wit-bindgen c`
 * generates from wit/ (world `step`), then wrapped as a component with the
 * WASI preview1 adapter; see docs/guests/c.md. From the repository root
 * (the tests do the same, in tests/build_langs.rs):
 *
 *   apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32
 *   cargo install --locked --root target/tools wit-bindgen-cli@0.46.0
 *   cargo install --locked --root target/tools --no-default-features \
 *       --features component wasm-tools@1.239.0
 *   B=target/c-transform; S=guest-examples/c/transform
 *   target/tools/bin/wit-bindgen c wit --world step \
 *       --features clocks-timezone --out-dir $B
 *   clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall \
 *       -Wl,--strip-debug -I $B $S/transform.c $S/json.c $B/step.c \
 *       $B/step_component_type.o -o $B/transform.core.wasm
 *   (the adapter: the bytes WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER of the
 *    crate wasi-preview1-component-adapter-provider 48.0.8, the file
 *    artefacts/wasi_snapshot_preview1.reactor.wasm in its source)
 *   target/tools/bin/wasm-tools component new $B/transform.core.wasm \
 *       --adapt wasi_snapshot_preview1=$B/wasi_snapshot_preview1.reactor.wasm \
 *       -o $B/transform.wasm
 *
 * Where the Rust step would wrap a u64 around, this one fails instead. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "step.h"

/* Sets `err` to a fatal step-error with the formatted message; returns
 * false, for `return fatal(...)`. */
__attribute__((format(printf, 2, 3))) static bool fatal(step_step_error_t *err, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int len = vsnprintf(NULL, 0, format, args);
    va_end(args);
    char *message = malloc(len > 0 ? (size_t)len + 1 : 1);
    if (!message) abort(); /* a trap: the attempt fails */
    va_start(args, format);
    vsnprintf(message, (size_t)len + 1, format, args);
    va_end(args);
    err->tag = STEPBOX_STEP_TYPES_STEP_ERROR_FATAL;
    err->val.fatal.ptr = (uint8_t *)message; /* the bindings free it */
    err->val.fatal.len = (size_t)len;
    return false;
}

/* The config value `key` in `value` (is_some false when it is unset). */
static bool config(const char *key, step_option_string_t *value, step_step_error_t *err) {
    step_string_t name;
    wasi_config_store_error_t error;
    step_string_set(&name, key);
    if (wasi_config_store_get(&name, value, &error)) return true;
    /* Both cases (upstream, io) carry a message. */
    step_string_t *text = error.tag == WASI_CONFIG_STORE_ERROR_UPSTREAM ? &error.val.upstream : &error.val.io;
    fatal(err, "reading configuration failed: %.*s", (int)text->len, (const char *)text->ptr);
    wasi_config_store_error_free(&error);
    return false;
}

/* Parses a config value as Rust's u64::from_str does ("+" allowed); NULL on
 * success, else why not. */
static const char *parse_u64(const uint8_t *text, size_t len, uint64_t *out) {
    if (len == 0) return "cannot parse integer from empty string";
    size_t i = text[0] == '+' && len > 1 ? 1 : 0;
    uint64_t n = 0;
    for (; i < len; i++) {
        if (text[i] < '0' || text[i] > '9') return "invalid digit found in string";
        if (__builtin_mul_overflow(n, 10, &n) || __builtin_add_overflow(n, (uint64_t)(text[i] - '0'), &n))
            return "number too large to fit in target type";
    }
    *out = n;
    return NULL;
}

/* `text` quoted, with quotes, backslashes and control characters escaped. */
static void quoted(json_buf *buf, const uint8_t *text, size_t len) {
    json_raw(buf, "\"");
    for (size_t i = 0; i < len; i++) {
        char c[16];
        if (text[i] == '"' || text[i] == '\\') snprintf(c, sizeof c, "\\%c", text[i]);
        else if (text[i] == '\n') strcpy(c, "\\n");
        else if (text[i] == '\t') strcpy(c, "\\t");
        else if (text[i] == '\r') strcpy(c, "\\r");
        else if (text[i] < 0x20 || text[i] == 0x7f) snprintf(c, sizeof c, "\\u{%x}", text[i]);
        else c[0] = (char)text[i], c[1] = '\0';
        json_raw(buf, c);
    }
    json_raw(buf, "\"");
}

/* The member `key` of the object `object`, of kind `kind`; otherwise (also
 * when the key is there twice, which serde refuses too) a fatal error naming
 * `path`, and NULL. */
static const json_value *field(const json_value *object, const char *key, json_kind kind, const char *path,
                               step_step_error_t *err) {
    const json_value *value = NULL;
    for (size_t i = 0; i < object->count; i++) {
        if (strcmp(object->keys[i], key) != 0) continue;
        if (value) {
            fatal(err, "invalid order: duplicate field `%s`", path);
            return NULL;
        }
        value = object->items[i];
    }
    static const char *const kinds[] = {[JSON_NULL] = "null", [JSON_BOOL] = "true or false",
        [JSON_NUMBER] = "a number", [JSON_STRING] = "a string", [JSON_OBJECT] = "an object", [JSON_ARRAY] = "a list"};
    if (!value) fatal(err, "invalid order: missing field `%s`", path);
    else if (value->kind != kind) fatal(err, "invalid order: `%s` must be %s", path, kinds[kind]);
    else return value;
    return NULL;
}

/* The member `key` of `object` as a whole number up to `max`; otherwise a
 * fatal error naming `path`. */
static bool u64_field(const json_value *object, const char *key, const char *path, uint64_t max, uint64_t *out,
                      step_step_error_t *err) {
    const json_value *value = field(object, key, JSON_NUMBER, path, err);
    if (!value) return false;
    if (!json_u64(value, out) || *out > max)
        return fatal(err, "invalid order: `%s` must be a whole number from 0 to %llu", path, (unsigned long long)max);
    return true;
}

static void log_info(const char *message) {
    step_string_t context, text;
    step_string_set(&context, "transform");
    step_string_set(&text, message);
    wasi_logging_logging_log(WASI_LOGGING_LOGGING_LEVEL_INFO, &context, &text);
}

/* Writes the invoice for `order` into `out`; false with `err` set if the
 * order or the config is not usable. */
static bool invoice(const json_value *order, json_buf *out, step_step_error_t *err) {
    if (order->kind != JSON_OBJECT) return fatal(err, "invalid order: the input must be a JSON object");
    const json_value *id, *customer, *first, *last, *items;
    if (!(id = field(order, "id", JSON_STRING, "id", err))) return false;
    if (!(customer = field(order, "customer", JSON_OBJECT, "customer", err))) return false;
    if (!(first = field(customer, "first_name", JSON_STRING, "customer.first_name", err))) return false;
    if (!(last = field(customer, "last_name", JSON_STRING, "customer.last_name", err))) return false;
    if (!(items = field(order, "items", JSON_ARRAY, "items", err))) return false;
    if (items->count == 0) return fatal(err, "order %s has no items", id->text);

    /* Check every item before the config, as the Rust step (serde) does. */
    uint64_t *amounts = calloc(items->count, sizeof *amounts);
    if (!amounts) abort();
    uint64_t subtotal = 0;
    bool ok = true;
    for (size_t i = 0; ok && i < items->count; i++) {
        const json_value *item = items->items[i];
        char sku[48], quantity[48], price[48];
        uint64_t q, p;
        if (item->kind != JSON_OBJECT) {
            ok = fatal(err, "invalid order: `items[%zu]` must be an object", i);
            break;
        }
        snprintf(sku, sizeof sku, "items[%zu].sku", i);
        snprintf(quantity, sizeof quantity, "items[%zu].quantity", i);
        snprintf(price, sizeof price, "items[%zu].unit_price_cents", i);
        if (!field(item, "sku", JSON_STRING, sku, err) || !u64_field(item, "quantity", quantity, UINT32_MAX, &q, err) ||
            !u64_field(item, "unit_price_cents", price, UINT64_MAX, &p, err))
            ok = false;
        else if (__builtin_mul_overflow(q, p, &amounts[i]) || __builtin_add_overflow(subtotal, amounts[i], &subtotal))
            ok = fatal(err, "order %s: the amounts do not fit in 64 bits", id->text);
    }

    step_option_string_t currency = {0}, tax_text = {0};
    uint64_t tax_percent = 0, tax = 0, total = 0;
    if (ok) ok = config("currency", &currency, err) && config("tax_percent", &tax_text, err);
    if (ok && tax_text.is_some) {
        const char *why = parse_u64(tax_text.val.ptr, tax_text.val.len, &tax_percent);
        if (why) {
            json_buf value = {0};
            quoted(&value, tax_text.val.ptr, tax_text.val.len);
            if (value.failed) abort();
            ok = fatal(err, "the config value `tax_percent` = %s is not a valid u64: %s", value.data, why);
            free(value.data);
        }
    }
    if (ok) {
        if (__builtin_mul_overflow(subtotal, tax_percent, &tax)) {
            ok = fatal(err, "order %s: the tax does not fit in 64 bits", id->text);
        } else {
            tax /= 100;
            if (__builtin_add_overflow(subtotal, tax, &total))
                ok = fatal(err, "order %s: the total does not fit in 64 bits", id->text);
        }
    }

    if (ok) {
        json_raw(out, "{\"invoice_for\":");
        json_string(out, id->text, id->len);
        /* Not snprintf: a name may hold a NUL (\u0000). */
        char *name = malloc(first->len + 1 + last->len);
        if (!name) abort();
        memcpy(name, first->text, first->len);
        name[first->len] = ' ';
        memcpy(name + first->len + 1, last->text, last->len);
        json_raw(out, ",\"bill_to\":");
        json_string(out, name, first->len + 1 + last->len);
        free(name);
        json_raw(out, ",\"currency\":");
        if (currency.is_some) json_string(out, (const char *)currency.val.ptr, currency.val.len);
        else json_string(out, "USD", 3);
        json_raw(out, ",\"lines\":[");
        for (size_t i = 0; i < items->count; i++) {
            const json_value *sku = json_get(items->items[i], "sku");
            json_raw(out, i == 0 ? "{\"sku\":" : ",{\"sku\":");
            json_string(out, sku->text, sku->len);
            json_raw(out, ",\"amount_cents\":");
            json_u64_out(out, amounts[i]);
            json_raw(out, "}");
        }
        json_raw(out, "],\"subtotal_cents\":");
        json_u64_out(out, subtotal);
        json_raw(out, ",\"tax_cents\":");
        json_u64_out(out, tax);
        json_raw(out, ",\"total_cents\":");
        json_u64_out(out, total);
        json_raw(out, "}");
        if (out->failed) abort();
    }
    free(amounts);
    if (currency.is_some) step_string_free(&currency.val);
    if (tax_text.is_some) step_string_free(&tax_text.val);
    return ok;
}

/* The export. The arguments are ours to free; the bindings free the
 * returned string or error after the call (cabi_post_run). */
bool exports_step_run(step_step_context_t *ctx, step_string_t *input, step_string_t *ret, step_step_error_t *err) {
    char error[128];
    json_value *order = json_parse((const char *)input->ptr, input->len, error, sizeof error);
    bool ok;
    if (!order) {
        ok = fatal(err, "the input is not JSON: %s", error);
    } else {
        json_buf out = {0};
        ok = invoice(order, &out, err);
        if (ok) {
            const json_value *id = json_get(order, "id");
            char *message = malloc(id->len + sizeof "invoice for ");
            if (message) {
                memcpy(message, "invoice for ", sizeof "invoice for " - 1);
                memcpy(message + sizeof "invoice for " - 1, id->text, id->len + 1);
                log_info(message);
                free(message);
            }
            ret->ptr = (uint8_t *)out.data;
            ret->len = out.len;
        }
        json_free(order);
    }
    step_string_free(input);
    stepbox_step_types_step_context_free(ctx);
    return ok;
}
