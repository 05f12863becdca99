/* The __NAME__ step: {"name": "Ada"} -> {"greeting": "Hello, Ada!"}.
 *
 * The greeting word comes from the `greeting` config value, if the workflow
 * sets one. Return false with err->tag = STEPBOX_STEP_TYPES_STEP_ERROR_RETRYABLE
 * for a failure worth another attempt, ..._FATAL for one that is not. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "step.h"

static bool fatal(step_step_error_t *err, const char *message) {
    err->tag = STEPBOX_STEP_TYPES_STEP_ERROR_FATAL;
    step_string_dup(&err->val.fatal, message);
    return false;
}

bool exports_step_run(step_step_context_t *ctx, step_string_t *input, step_string_t *ret, step_step_error_t *err) {
    char error[128];
    json_value *in = json_parse((const char *)input->ptr, input->len, error, sizeof error);
    const json_value *name = json_get(in, "name");
    bool ok;
    if (!in) {
        ok = fatal(err, error);
    } else if (!name || name->kind != JSON_STRING || name->len == 0) {
        ok = fatal(err, "`name` must be a non-empty string");
    } else {
        step_string_t key, context, message;
        step_option_string_t word;
        wasi_config_store_error_t config_error;
        step_string_set(&key, "greeting");
        if (!wasi_config_store_get(&key, &word, &config_error)) {
            wasi_config_store_error_free(&config_error);
            word.is_some = false;
        }
        char text[160];
        snprintf(text, sizeof text, "greeting %.100s (attempt %u)", name->text, ctx->attempt);
        step_string_set(&context, "__NAME__");
        step_string_set(&message, text);
        wasi_logging_logging_log(WASI_LOGGING_LOGGING_LEVEL_INFO, &context, &message);

        json_buf out = {0};
        json_raw(&out, "{\"greeting\":");
        char *greeting = malloc(name->len + 64 + (word.is_some ? word.val.len : 5));
        if (greeting) {
            int n = sprintf(greeting, "%.*s, %s!", word.is_some ? (int)word.val.len : 5,
                            word.is_some ? (const char *)word.val.ptr : "Hello", name->text);
            json_string(&out, greeting, (size_t)n);
            free(greeting);
        }
        json_raw(&out, "}");
        if (word.is_some) step_string_free(&word.val);
        if (!greeting || out.failed) {
            free(out.data);
            ok = fatal(err, "out of memory");
        } else {
            /* The bindings free the returned string after the call. */
            ret->ptr = (uint8_t *)out.data;
            ret->len = out.len;
            ok = true;
        }
    }
    json_free(in);
    step_string_free(input);
    stepbox_step_types_step_context_free(ctx);
    return ok;
}
