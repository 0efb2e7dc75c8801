/*
 * QMP framing: bytes from QEMU in, one JSON object per line out. Kept
 * apart from the socket so that it can be tested and fuzzed alone. QEMU is
 * input like any other: a line is bounded (a peer that never sends a
 * newline cannot grow our memory), and a line that is not one JSON object
 * is an error, not a guess.
 */
#include <string.h>

#include "internal.h"

void qmp_framer_init(QmpFramer *f, gsize max_line)
{
    f->buf = g_string_new(NULL);
    f->max_line = max_line;
}

void qmp_framer_clear(QmpFramer *f)
{
    if (f->buf) {
        g_string_free(f->buf, TRUE);
        f->buf = NULL;
    }
}

void qmp_framer_push(QmpFramer *f, const char *data, gsize len)
{
    g_string_append_len(f->buf, data, len);
}

int qmp_framer_next(QmpFramer *f, json_object **msg, GError **error)
{
    *msg = NULL;
    for (;;) {
        char *nl = memchr(f->buf->str, '\n', f->buf->len);
        gsize len = nl ? (gsize)(nl - f->buf->str) : f->buf->len;
        enum json_tokener_error jerr = json_tokener_success;
        json_tokener *tok;
        json_object *o;

        if (len > f->max_line) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                        "QEMU sent a line longer than %" G_GSIZE_FORMAT
                        " bytes",
                        f->max_line);
            return -1;
        }
        if (!nl) {
            return 0; /* not a whole line yet */
        }
        while (len > 0 && g_ascii_isspace(f->buf->str[len - 1])) {
            len--;
        }
        if (len == 0) {
            g_string_erase(f->buf, 0, nl - f->buf->str + 1);
            continue;
        }
        tok = json_tokener_new();
        o = json_tokener_parse_ex(tok, f->buf->str, (int)len);
        jerr = json_tokener_get_error(tok);
        if (o && jerr == json_tokener_success &&
            json_tokener_get_parse_end(tok) != len) {
            jerr = json_tokener_error_parse_unexpected; /* two objects */
        }
        json_tokener_free(tok);
        g_string_erase(f->buf, 0, nl - f->buf->str + 1);
        if (!o || jerr != json_tokener_success ||
            !json_object_is_type(o, json_type_object)) {
            g_set_error(
                error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                "QEMU sent something that is not QMP: %s",
                o && jerr == json_tokener_success
                    ? "not a JSON object"
                    : json_tokener_error_desc(jerr == json_tokener_continue
                                                  ? json_tokener_error_parse_eof
                                                  : jerr));
            json_object_put(o);
            return -1;
        }
        *msg = o;
        return 1;
    }
}

QmpMessageKind qmp_message_kind(json_object *msg, const char **name)
{
    json_object *v;

    *name = NULL;
    if (json_object_object_get_ex(msg, "event", &v)) {
        if (!json_object_is_type(v, json_type_string)) {
            return QMP_MESSAGE_BAD;
        }
        *name = json_object_get_string(v);
        return QMP_MESSAGE_EVENT;
    }
    if (json_object_object_get_ex(msg, "return", NULL) ||
        json_object_object_get_ex(msg, "error", NULL)) {
        return QMP_MESSAGE_REPLY;
    }
    if (json_object_object_get_ex(msg, "QMP", NULL)) {
        return QMP_MESSAGE_GREETING;
    }
    return QMP_MESSAGE_BAD;
}
