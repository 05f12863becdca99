/* A small JSON reader and writer: enough for a step's input and output.
 *
 * json_parse() builds a tree of json_value; strings are decoded to UTF-8
 * (escapes included). Numbers keep their text, so whole numbers of any size
 * read back exactly with json_u64(). */
#ifndef STEPBOX_JSON_H
#define STEPBOX_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_kind;

typedef struct json_value json_value;
struct json_value {
    json_kind kind;
    bool boolean;
    char *text;          /* JSON_STRING: decoded UTF-8; JSON_NUMBER: as written */
    size_t len;          /* length of text */
    json_value **items;  /* JSON_ARRAY and JSON_OBJECT: the values */
    char **keys;         /* JSON_OBJECT: the keys, decoded */
    size_t count;
};

/* Parses `len` bytes. Returns NULL on error and writes a message to `error`
 * (at most `error_size` bytes). */
json_value *json_parse(const char *text, size_t len, char *error, size_t error_size);
void json_free(json_value *value);

/* The member `key` of an object, or NULL. */
const json_value *json_get(const json_value *object, const char *key);
/* A whole number that fits in 64 bits; false otherwise. */
bool json_u64(const json_value *number, uint64_t *out);

/* A growable output buffer. */
typedef struct {
    char *data;
    size_t len, cap;
    bool failed; /* out of memory */
} json_buf;

void json_raw(json_buf *buf, const char *text);
void json_string(json_buf *buf, const char *text, size_t len);
void json_u64_out(json_buf *buf, uint64_t number);

#endif
