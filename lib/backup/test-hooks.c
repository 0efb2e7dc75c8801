/*
 * Hooks for the tests, compiled in test builds only (QBK_TEST_HOOKS): a
 * release build ignores $QBK_CRASH_AT, $QBK_FAIL_AT and $QBK_SLOW_AT, so
 * no environment variable can make a production run stop, fail or wait
 * half-way.
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

bool backup_test_fail(const char *where, GError **error)
{
#ifdef QBK_TEST_HOOKS
    if (g_strcmp0(g_getenv("QBK_FAIL_AT"), where) == 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "failed on purpose at '%s' (QBK_FAIL_AT)", where);
        return true;
    }
#else
    (void)where;
    (void)error;
#endif
    return false;
}

void backup_test_slow(const char *where)
{
#ifdef QBK_TEST_HOOKS
    if (g_strcmp0(g_getenv("QBK_SLOW_AT"), where) == 0) {
        g_usleep(2 * G_USEC_PER_SEC);
    }
#else
    (void)where;
#endif
}
