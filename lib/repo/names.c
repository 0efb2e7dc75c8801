/*
 * Plain names: what a disk id or a backup id must be before it becomes
 * part of a path. The rule is narrow on purpose, so that the name is the
 * file name component (no mapping, hence no two names on one directory)
 * and can never climb out of its directory.
 */
#include <string.h>

#include "repo.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-repo-error-quark, repo_error)
/* clang-format on */

bool repo_check_name(const char *kind, const char *name, GError **error)
{
    size_t len = name ? strlen(name) : 0;

    if (len == 0 || len > REPO_NAME_MAX) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_INVALID,
                    "%s name '%s' must have 1 to %d characters", kind,
                    name ? name : "", REPO_NAME_MAX);
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        char c = name[i];

        if (!g_ascii_isalnum(c) &&
            (i == 0 || (c != '.' && c != '_' && c != '+' && c != '-'))) {
            g_autofree char *shown = g_strescape(name, NULL);

            g_set_error(error, REPO_ERROR, REPO_ERROR_INVALID,
                        "%s name '%s' may only hold letters, digits and "
                        ". _ + - (not first)",
                        kind, shown);
            return false;
        }
    }
    if (strcmp(kind, "backup") == 0 &&
        (strcmp(name, "latest") == 0 || g_str_has_suffix(name, ".partial") ||
         g_str_has_suffix(name, ".merging"))) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_INVALID,
                    "'%s' cannot be a backup id", name);
        return false;
    }
    return true;
}
