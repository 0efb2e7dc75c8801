/*
 * Hooks for the tests, compiled in test builds only (QBK_TEST_HOOKS): a
 * release build ignores $QBK_CRASH_AT, so no environment variable can
 * make a production run stop half-way.
 */
#include <unistd.h>

#include "internal.h"

void backup_test_crash(const char *where)
{
#ifdef QBK_TEST_HOOKS
    if (g_strcmp0(g_getenv("QBK_CRASH_AT"), where) == 0) {
        _exit(99);
    }
#else
    (void)where;
#endif
}
