/*
 * Fuzz target: QMP framing, as bytes arrive from QEMU in pieces of any
 * size. The first byte chooses the piece size; lines are bounded, each
 * message is a JSON object or an error, and classifying it never crashes.
 */
#include "../../lib/qmp/internal.h"

int LLVMFuzzerTestOneInput(const guint8 *data, size_t size);

int LLVMFuzzerTestOneInput(const guint8 *data, size_t size)
{
    QmpFramer f;
    size_t piece;

    if (size == 0) {
        return 0;
    }
    piece = data[0] % 64 + 1;
    data++;
    size--;
    qmp_framer_init(&f, 4096); /* small, to reach the bound */
    for (size_t off = 0; off < size; off += piece) {
        json_object *msg;
        int rc;

        qmp_framer_push(&f, (const char *)data + off, MIN(piece, size - off));
        while ((rc = qmp_framer_next(&f, &msg, NULL)) != 0) {
            const char *name;

            if (rc > 0) {
                g_assert(json_object_is_type(msg, json_type_object));
                if (qmp_message_kind(msg, &name) == QMP_MESSAGE_EVENT) {
                    g_assert(name);
                }
                /* the getters never abort on what QEMU sends */
                qmp_json_length(qmp_json_array(msg, "return"));
                qmp_json_index(msg, 3);
                qmp_json_string(msg, "event");
                qmp_json_uint(msg, "id");
                json_object_put(msg);
            }
        }
        g_assert(f.buf->len <= 4096 + piece);
    }
    qmp_framer_clear(&f);
    return 0;
}
