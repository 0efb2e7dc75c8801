/*
 * qbk-test-dense-digests SIZE SPARSE DENSE: rewrite a digest file of a disk
 * of SIZE bytes in the dense layout of the first repositories (every
 * block's digest as it is) and print its checksum as they computed it
 * (every block's digest), so that tests can make a repository from before
 * the sparse layout and the data-blocks checksum.
 */
#include <fcntl.h>
#include <glib.h>
#include <stdio.h>
#include <unistd.h>

#include "copier.h"

int main(int argc, char **argv)
{
    guint64 size, nblocks;
    guint8 d[COPIER_DIGEST_LEN];
    char *sum;
    int in, out;

    if (argc != 4 || !(size = g_ascii_strtoull(argv[1], NULL, 10))) {
        fprintf(stderr, "usage: %s SIZE SPARSE DENSE\n", argv[0]);
        return 2;
    }
    nblocks = copier_block_count(size);
    in = open(argv[2], O_RDONLY | O_CLOEXEC);
    out = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (in < 0 || out < 0) {
        perror("open");
        return 1;
    }
    for (guint64 b = 0; b < nblocks; b++) {
        if (!copier_digests_read(in, size, false, b, 1, d) ||
            pwrite(out, d, sizeof(d), b * sizeof(d)) != sizeof(d)) {
            fprintf(stderr, "%s: short or unwritable\n", argv[0]);
            return 1;
        }
    }
    if (close(out) != 0 || (out = open(argv[3], O_RDONLY | O_CLOEXEC)) < 0 ||
        !(sum = copier_digests_checksum(out, size, true, COPIER_SUM_BLOCKS,
                                        NULL))) {
        fprintf(stderr, "%s: cannot read back %s\n", argv[0], argv[3]);
        return 1;
    }
    printf("%s\n", sum);
    g_free(sum);
    return 0;
}
