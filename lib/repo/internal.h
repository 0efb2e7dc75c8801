/*
 * Private to lib/repo.
 */
#ifndef QBK_REPO_INTERNAL_H
#define QBK_REPO_INTERNAL_H

#include "repo.h"

struct Repo {
    char *root;     /* absolute */
    int lock_fd;    /* holds the writer's lock, or -1 */
    char *key_file; /* the key, checked against the repository's (key.c);
                       NULL until then */
};

/* The largest manifest or journal read. */
#define MAX_JSON_SIZE (16 << 20)

/* The contents of PATH, a file of the repository read never through a
 * symbolic link, at most MAX_JSON_SIZE bytes (NUL-terminated; *LEN bytes
 * without the NUL). */
char *repo_read_text(const char *path, size_t *len, GError **error);

/* Set ERROR to REPO_ERROR_CORRUPT with FMT; returns false (json.c). */
G_GNUC_PRINTF(2, 3)
bool repo_corrupt(GError **error, const char *fmt, ...);

/* ---- strict JSON getters (json.c) ----
 * Each fails with REPO_ERROR_CORRUPT naming WHAT and the key when the
 * member is missing (unless OPTIONAL), null where not allowed, or of
 * another type. */
bool jget_string(json_object *o, const char *key, bool optional,
                 const char *what, const char **out, GError **error);
bool jget_uint(json_object *o, const char *key, const char *what, guint64 *out,
               GError **error);
bool jget_bool(json_object *o, const char *key, const char *what, bool *out,
               GError **error);
bool jget_array(json_object *o, const char *key, bool optional,
                const char *what, json_object **out, GError **error);
bool jget_object(json_object *o, const char *key, bool optional,
                 const char *what, json_object **out, GError **error);

/* Parse TEXT as one JSON object (new reference), or fail as corrupt. */
json_object *jparse_object(const char *text, size_t len, const char *what,
                           GError **error);

#endif /* QBK_REPO_INTERNAL_H */
