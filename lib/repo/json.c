/*
 * Strict readers of JSON members: a file of the repository is input, so a
 * member of the wrong type is an error with its name, never a default.
 */
#include <string.h>

#include "internal.h"

bool repo_corrupt(GError **error, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_propagate_error(
        error, g_error_new_valist(REPO_ERROR, REPO_ERROR_CORRUPT, fmt, ap));
    va_end(ap);
    return false;
}

/* The member KEY of O in *V, if it is of TYPE (IS_NOT says what it then is
 * not); NULL if absent or null, which is an error unless OPTIONAL. */
static bool member(json_object *o, const char *key, bool optional,
                   json_type type, const char *is_not, const char *what,
                   json_object **v, GError **error)
{
    json_object *m = NULL;

    *v = NULL;
    if (!json_object_object_get_ex(o, key, &m) || !m) {
        return optional ||
               repo_corrupt(error, "%s: \"%s\" is missing", what, key);
    }
    if (!json_object_is_type(m, type)) {
        return repo_corrupt(error, "%s: \"%s\" is not %s", what, key, is_not);
    }
    *v = m;
    return true;
}

bool jget_string(json_object *o, const char *key, bool optional,
                 const char *what, const char **out, GError **error)
{
    json_object *v;

    *out = NULL;
    if (!member(o, key, optional, json_type_string, "a string", what, &v,
                error)) {
        return false;
    }
    if (v) {
        *out = json_object_get_string(v);
        if (strlen(*out) != (size_t)json_object_get_string_len(v)) {
            return repo_corrupt(error, "%s: \"%s\" holds a NUL byte", what,
                                key);
        }
    }
    return true;
}

bool jget_uint(json_object *o, const char *key, const char *what, guint64 *out,
               GError **error)
{
    const char *is_not = "a non-negative integer";
    json_object *v;

    if (!member(o, key, false, json_type_int, is_not, what, &v, error)) {
        return false;
    }
    /* json-c keeps integers as int64 or uint64; a negative number is not a
     * size (a fractional one is no json_type_int) */
    if (json_object_get_int64(v) < 0 && json_object_get_uint64(v) == 0) {
        return repo_corrupt(error, "%s: \"%s\" is not %s", what, key, is_not);
    }
    *out = json_object_get_uint64(v);
    return true;
}

bool jget_bool(json_object *o, const char *key, const char *what, bool *out,
               GError **error)
{
    json_object *v;

    *out = false;
    if (!member(o, key, true, json_type_boolean, "true or false", what, &v,
                error)) {
        return false;
    }
    *out = v && json_object_get_boolean(v);
    return true;
}

bool jget_array(json_object *o, const char *key, bool optional,
                const char *what, json_object **out, GError **error)
{
    return member(o, key, optional, json_type_array, "an array", what, out,
                  error);
}

bool jget_object(json_object *o, const char *key, bool optional,
                 const char *what, json_object **out, GError **error)
{
    return member(o, key, optional, json_type_object, "an object", what, out,
                  error);
}

json_object *jparse_object(const char *text, size_t len, const char *what,
                           GError **error)
{
    json_tokener *tok = json_tokener_new_ex(JSON_TOKENER_DEFAULT_DEPTH);
    enum json_tokener_error jerr;
    json_object *o;

    if (!tok) {
        repo_corrupt(error, "%s: out of memory", what);
        return NULL;
    }
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    o = json_tokener_parse_ex(tok, text, (int)MIN(len, (size_t)G_MAXINT));
    jerr = json_tokener_get_error(tok);
    /* one whole object, and nothing after it but white space */
    if (o && jerr == json_tokener_success) {
        size_t used = json_tokener_get_parse_end(tok);

        while (used < len && g_ascii_isspace(text[used])) {
            used++;
        }
        if (used != len) {
            jerr = json_tokener_error_parse_unexpected;
        }
    }
    json_tokener_free(tok);
    if (!o || jerr != json_tokener_success) {
        const char *why =
            o ? "text after the object"
              : json_tokener_error_desc(jerr == json_tokener_continue
                                            ? json_tokener_error_parse_eof
                                            : jerr);

        repo_corrupt(error, "%s is not valid JSON (%s)", what, why);
        json_object_put(o);
        return NULL;
    }
    if (!json_object_is_type(o, json_type_object)) {
        json_object_put(o);
        repo_corrupt(error, "%s is not a JSON object", what);
        return NULL;
    }
    return o;
}
