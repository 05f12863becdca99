/* See json.h. */
#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *start, *at, *end;
    char *error;
    size_t error_size;
    int depth;
} parser;

/* Deeper nesting than this is refused rather than recursed into. */
#define MAX_DEPTH 64

static bool fail(parser *p, const char *message) {
    if (p->error[0] == '\0') {
        snprintf(p->error, p->error_size, "%s at byte %zu", message, (size_t)(p->at - p->start));
    }
    return false;
}

static void skip_space(parser *p) {
    while (p->at < p->end && (*p->at == ' ' || *p->at == '\t' || *p->at == '\n' || *p->at == '\r')) p->at++;
}

static bool push(json_value *v, json_value *item, char *key) {
    json_value **items = realloc(v->items, (v->count + 1) * sizeof *items);
    if (!items) return false;
    v->items = items;
    if (v->kind == JSON_OBJECT) {
        char **keys = realloc(v->keys, (v->count + 1) * sizeof *keys);
        if (!keys) return false;
        v->keys = keys;
        v->keys[v->count] = key;
    }
    v->items[v->count++] = item;
    return true;
}

static void put_utf8(char *out, size_t *n, uint32_t c) {
    if (c < 0x80) {
        out[(*n)++] = (char)c;
    } else if (c < 0x800) {
        out[(*n)++] = (char)(0xC0 | (c >> 6));
        out[(*n)++] = (char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        out[(*n)++] = (char)(0xE0 | (c >> 12));
        out[(*n)++] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (c & 0x3F));
    } else {
        out[(*n)++] = (char)(0xF0 | (c >> 18));
        out[(*n)++] = (char)(0x80 | ((c >> 12) & 0x3F));
        out[(*n)++] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (c & 0x3F));
    }
}

static bool hex4(parser *p, uint32_t *out) {
    if (p->end - p->at < 4) return fail(p, "a \\u escape is cut short");
    uint32_t c = 0;
    for (int i = 0; i < 4; i++) {
        char h = *p->at++;
        c <<= 4;
        if (h >= '0' && h <= '9') c |= (uint32_t)(h - '0');
        else if (h >= 'a' && h <= 'f') c |= (uint32_t)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F') c |= (uint32_t)(h - 'A' + 10);
        else return fail(p, "a \\u escape has a character that is not hex");
    }
    *out = c;
    return true;
}

/* Reads a string after its opening quote. The decoded text is never longer
 * than the escaped one, so one allocation of that size is enough. */
static bool parse_string(parser *p, char **out, size_t *out_len) {
    const char *start = p->at;
    while (p->at < p->end && *p->at != '"') p->at += (*p->at == '\\' && p->at + 1 < p->end) ? 2 : 1;
    if (p->at >= p->end) return fail(p, "a string is not closed");
    size_t max = (size_t)(p->at - start);
    p->at = start;
    char *text = malloc(max + 1);
    if (!text) return fail(p, "out of memory");
    size_t n = 0;
    while (*p->at != '"') {
        unsigned char c = (unsigned char)*p->at++;
        if (c < 0x20) { free(text); return fail(p, "a string has a raw control character"); }
        if (c != '\\') { text[n++] = (char)c; continue; }
        char e = *p->at++;
        switch (e) {
            case '"': text[n++] = '"'; break;
            case '\\': text[n++] = '\\'; break;
            case '/': text[n++] = '/'; break;
            case 'b': text[n++] = '\b'; break;
            case 'f': text[n++] = '\f'; break;
            case 'n': text[n++] = '\n'; break;
            case 'r': text[n++] = '\r'; break;
            case 't': text[n++] = '\t'; break;
            case 'u': {
                uint32_t c1;
                if (!hex4(p, &c1)) { free(text); return false; }
                if (c1 >= 0xD800 && c1 < 0xDC00 && p->end - p->at >= 6 && p->at[0] == '\\' && p->at[1] == 'u') {
                    uint32_t c2;
                    p->at += 2;
                    if (!hex4(p, &c2)) { free(text); return false; }
                    if (c2 < 0xDC00 || c2 > 0xDFFF) { free(text); return fail(p, "a surrogate pair is broken"); }
                    c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
                } else if (c1 >= 0xD800 && c1 <= 0xDFFF) {
                    free(text);
                    return fail(p, "a lone surrogate in a \\u escape");
                }
                put_utf8(text, &n, c1);
                break;
            }
            default: free(text); return fail(p, "a string has an unknown escape");
        }
    }
    p->at++;
    text[n] = '\0';
    *out = text;
    *out_len = n;
    return true;
}

static json_value *parse_value(parser *p);

static json_value *new_value(parser *p, json_kind kind) {
    json_value *v = calloc(1, sizeof *v);
    if (!v) fail(p, "out of memory");
    else v->kind = kind;
    return v;
}

static json_value *parse_container(parser *p, json_kind kind, char close) {
    if (++p->depth > MAX_DEPTH) { fail(p, "nested too deeply"); return NULL; }
    json_value *v = new_value(p, kind);
    if (!v) return NULL;
    skip_space(p);
    if (p->at < p->end && *p->at == close) { p->at++; p->depth--; return v; }
    for (;;) {
        char *key = NULL;
        size_t key_len;
        skip_space(p);
        if (kind == JSON_OBJECT) {
            if (p->at >= p->end || *p->at != '"') { fail(p, "expected a key"); break; }
            p->at++;
            if (!parse_string(p, &key, &key_len)) break;
            skip_space(p);
            if (p->at >= p->end || *p->at != ':') { free(key); fail(p, "expected `:`"); break; }
            p->at++;
        }
        json_value *item = parse_value(p);
        if (!item) { free(key); break; }
        if (!push(v, item, key)) { json_free(item); free(key); fail(p, "out of memory"); break; }
        skip_space(p);
        if (p->at < p->end && *p->at == ',') { p->at++; continue; }
        if (p->at < p->end && *p->at == close) { p->at++; p->depth--; return v; }
        fail(p, kind == JSON_OBJECT ? "expected `,` or `}`" : "expected `,` or `]`");
        break;
    }
    json_free(v);
    return NULL;
}

static bool literal(parser *p, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(p->end - p->at) < n || memcmp(p->at, word, n) != 0) return false;
    p->at += n;
    return true;
}

static size_t digits(parser *p) {
    size_t n = 0;
    while (p->at < p->end && *p->at >= '0' && *p->at <= '9') p->at++, n++;
    return n;
}

/* Moves past a number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool scan_number(parser *p) {
    if (*p->at == '-') p->at++;
    if (p->at < p->end && *p->at == '0') {
        p->at++;
        if (p->at < p->end && *p->at >= '0' && *p->at <= '9') return fail(p, "a number has a leading zero");
    } else if (digits(p) == 0) {
        return fail(p, "a number has no digits");
    }
    if (p->at < p->end && *p->at == '.') {
        p->at++;
        if (digits(p) == 0) return fail(p, "a number has no digits after `.`");
    }
    if (p->at < p->end && (*p->at == 'e' || *p->at == 'E')) {
        p->at++;
        if (p->at < p->end && (*p->at == '+' || *p->at == '-')) p->at++;
        if (digits(p) == 0) return fail(p, "a number has no digits in its exponent");
    }
    return true;
}

static json_value *parse_value(parser *p) {
    skip_space(p);
    if (p->at >= p->end) { fail(p, "unexpected end of input"); return NULL; }
    char c = *p->at;
    json_value *v;
    if (c == '{') { p->at++; return parse_container(p, JSON_OBJECT, '}'); }
    if (c == '[') { p->at++; return parse_container(p, JSON_ARRAY, ']'); }
    if (c == '"') {
        p->at++;
        if (!(v = new_value(p, JSON_STRING))) return NULL;
        if (!parse_string(p, &v->text, &v->len)) { free(v); return NULL; }
        return v;
    }
    if (literal(p, "true") || literal(p, "false")) {
        if ((v = new_value(p, JSON_BOOL))) v->boolean = c == 't';
        return v;
    }
    if (literal(p, "null")) return new_value(p, JSON_NULL);
    if (c == '-' || (c >= '0' && c <= '9')) {
        const char *start = p->at;
        if (!scan_number(p)) return NULL;
        if (!(v = new_value(p, JSON_NUMBER))) return NULL;
        v->len = (size_t)(p->at - start);
        v->text = malloc(v->len + 1);
        if (!v->text) { free(v); fail(p, "out of memory"); return NULL; }
        memcpy(v->text, start, v->len);
        v->text[v->len] = '\0';
        return v;
    }
    fail(p, "unexpected character");
    return NULL;
}

json_value *json_parse(const char *text, size_t len, char *error, size_t error_size) {
    /* text may be NULL when len is 0 (NULL + 0 is undefined in C). */
    parser p = {text, text, len ? text + len : text, error, error_size, 0};
    error[0] = '\0';
    json_value *v = parse_value(&p);
    skip_space(&p);
    if (v && p.at != p.end) {
        json_free(v);
        fail(&p, "trailing characters");
        return NULL;
    }
    return v;
}

void json_free(json_value *v) {
    if (!v) return;
    for (size_t i = 0; i < v->count; i++) {
        json_free(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->text);
    free(v);
}

const json_value *json_get(const json_value *object, const char *key) {
    if (!object || object->kind != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < object->count; i++) {
        if (strcmp(object->keys[i], key) == 0) return object->items[i];
    }
    return NULL;
}

bool json_u64(const json_value *number, uint64_t *out) {
    if (!number || number->kind != JSON_NUMBER || number->len == 0) return false;
    uint64_t n = 0;
    for (size_t i = 0; i < number->len; i++) {
        char c = number->text[i];
        if (c < '0' || c > '9') return false;
        if (n > (UINT64_MAX - (uint64_t)(c - '0')) / 10) return false;
        n = n * 10 + (uint64_t)(c - '0');
    }
    *out = n;
    return true;
}

static void append(json_buf *buf, const char *data, size_t len) {
    if (buf->failed) return;
    if (buf->len + len + 1 > buf->cap) {
        size_t cap = buf->cap ? buf->cap : 256;
        while (cap < buf->len + len + 1) cap *= 2;
        char *grown = realloc(buf->data, cap);
        if (!grown) { buf->failed = true; return; }
        buf->data = grown;
        buf->cap = cap;
    }
    memcpy(buf->data + buf->len, data, len);
    buf->len += len;
    buf->data[buf->len] = '\0';
}

void json_raw(json_buf *buf, const char *text) { append(buf, text, strlen(text)); }

void json_string(json_buf *buf, const char *text, size_t len) {
    append(buf, "\"", 1);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        char escaped[8];
        if (c == '"' || c == '\\') {
            escaped[0] = '\\';
            escaped[1] = (char)c;
            append(buf, escaped, 2);
        } else if (c < 0x20) {
            const char *shorthand = c == '\n' ? "\\n" : c == '\t' ? "\\t" : c == '\r' ? "\\r"
                                  : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            if (shorthand) {
                append(buf, shorthand, 2);
            } else {
                snprintf(escaped, sizeof escaped, "\\u%04x", c);
                append(buf, escaped, 6);
            }
        } else {
            append(buf, (const char *)&c, 1);
        }
    }
    append(buf, "\"", 1);
}

void json_u64_out(json_buf *buf, uint64_t number) {
    char digits[24];
    snprintf(digits, sizeof digits, "%llu", (unsigned long long)number);
    json_raw(buf, digits);
}
