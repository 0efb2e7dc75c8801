/*
 * Fuzz target: manifests and merge journals, as read from a repository.
 * Whatever the bytes, parsing ends with a validated record or an error:
 * never a crash, a leak or a record that would lead a path elsewhere.
 */
#include <string.h>

#include "repo.h"

int LLVMFuzzerTestOneInput(const guint8 *data, size_t size);

/* Every path a record leads to stays in the repository's tree. */
static void check_paths(const Manifest *m)
{
    for (guint i = 0; i < m->disks->len; i++) {
        const ManifestDisk *d = m->disks->pdata[i];
        g_autofree char *image = repo_image_relpath(d->disk, m->id, d->format);

        g_assert(!strstr(image, "..") || strstr(d->disk, "..") ||
                 strstr(m->id, ".."));
        g_assert(image[0] != '/' && !strchr(d->disk, '/'));
        g_assert(!d->parent || (strcmp(d->parent, m->id) != 0 &&
                                repo_check_name("backup", d->parent, NULL)));
    }
}

int LLVMFuzzerTestOneInput(const guint8 *data, size_t size)
{
    const char *text = (const char *)data;
    Manifest *m;
    MergeJournal *j;

    for (int partial = 0; partial < 2; partial++) {
        m = manifest_parse(text, size, "20261130T120000Z", partial, "fuzz",
                           NULL);
        if (m) {
            check_paths(m);
            manifest_unref(m);
        }
    }
    j = merge_journal_parse(text, size, NULL);
    if (j) {
        g_assert(repo_check_name("disk", j->disk, NULL));
        g_assert(repo_check_name("backup", j->to, NULL));
        merge_journal_free(j);
    }
    return 0;
}
