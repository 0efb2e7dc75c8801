/*
 * Fuzz target: qcow2 headers, as qbk reads them to check a backup's chain
 * before any tool opens it.
 */
#include <string.h>

#include "repo.h"

int LLVMFuzzerTestOneInput(const guint8 *data, size_t size);

int LLVMFuzzerTestOneInput(const guint8 *data, size_t size)
{
    Qcow2Header h;

    if (qcow2_header_parse(data, size, &h, NULL)) {
        g_assert(h.version == 2 || h.version == 3);
        g_assert(!h.backing ||
                 (strlen(h.backing) > 0 && strlen(h.backing) <= 1023));
        qcow2_header_clear(&h);
    }
    return 0;
}
