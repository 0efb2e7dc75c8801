/*
 * Bytes as text: keys, salts, digests.
 */
#include "util.h"

char *util_hex(const guint8 *bytes, gsize n)
{
    static const char digits[] = "0123456789abcdef";
    char *s = g_malloc(2 * n + 1);

    for (gsize i = 0; i < n; i++) {
        s[2 * i] = digits[bytes[i] >> 4];
        s[2 * i + 1] = digits[bytes[i] & 15];
    }
    s[2 * n] = '\0';
    return s;
}
