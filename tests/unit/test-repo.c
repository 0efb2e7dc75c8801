/*
 * lib/repo against hostile and damaged input: names that would leave
 * their directory or collide, manifests and journals of every wrong shape,
 * qcow2 headers that point elsewhere, chains that loop, and a skeleton
 * with symbolic links in it. Each case is refused with REPO_ERROR_CORRUPT
 * or _INVALID (never an abort, a loop or a path outside the repository).
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "repo.h"

#define ID  "20261130T120000Z"
#define SUM "00112233445566778899aabbccddeeff"

/* ---- names ---- */

static void test_names(void)
{
    const char *good[] = { "disk0", "virtio-disk0", "a.b_c+d-e", ID, ID ".2" };
    const char *bad[] = { "",    "a/b",  "..",  ".hidden",    "-x",
                          "a b", "a\nb", "x:y", "caf\xc3\xa9" };

    for (guint i = 0; i < G_N_ELEMENTS(good); i++) {
        g_assert_true(repo_check_name("disk", good[i], NULL));
        g_assert_true(repo_check_name("backup", good[i], NULL));
    }
    for (guint i = 0; i < G_N_ELEMENTS(bad); i++) {
        g_autoptr(GError) error = NULL;

        g_assert_false(repo_check_name("disk", bad[i], &error));
        g_assert_error(error, REPO_ERROR, REPO_ERROR_INVALID);
    }
    g_assert_false(repo_check_name("disk", NULL, NULL));
    g_assert_false(repo_check_name("disk",
                                   "x23456789012345678901234567890123"
                                   "45678901234567890123456789012345",
                                   NULL));
    /* backup ids whose files would collide with another's */
    g_assert_false(repo_check_name("backup", "latest", NULL));
    g_assert_false(repo_check_name("backup", ID ".partial", NULL));
    g_assert_false(repo_check_name("backup", ID ".merging", NULL));
    g_assert_true(repo_check_name("disk", "latest", NULL));
}

/* ---- manifests ---- */

static const char *good_manifest =
    "{\"format\": \"qbk-manifest-1\", \"id\": \"" ID "\", "
    "\"status\": \"complete\", \"created\": \"2026-11-30T12:00:00Z\", "
    "\"checkpoint\": \"" ID "\", \"checkpoint_bitmap\": \"qbk-000002-" ID "\", "
    "\"disks\": [{\"disk\": \"disk0\", \"size\": 67108864, \"mode\": "
    "\"incremental\", \"parent\": \"20261129T120000Z\", \"format\": \"qcow2\", "
    "\"image\": \"disks/disk0/" ID ".qcow2\", \"digests\": \"disks/disk0/" ID
    ".digests\", \"checkpointed\": true, \"since\": \"qbk-since-" ID "-0\", "
    "\"checksum\": {\"algorithm\": \"xxh3-128-blocks-64k\", \"value\": \"" SUM
    "\"}}, {\"disk\": \"disk2\", \"size\": 16777216, \"mode\": \"full\", "
    "\"parent\": null, \"format\": \"raw\", \"checksum\": {\"algorithm\": "
    "\"xxh3-128-blocks-64k\", \"value\": \"" SUM "\"}}]}";

static Manifest *parse(const char *text, GError **error)
{
    return manifest_parse(text, strlen(text), ID, false, "m.json", error);
}

static void test_manifest_good(void)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(Manifest) m = parse(good_manifest, &error);
    const ManifestDisk *d;

    g_assert_no_error(error);
    g_assert_cmpstr(m->id, ==, ID);
    g_assert_cmpint(m->status, ==, MANIFEST_COMPLETE);
    g_assert_cmpuint(m->disks->len, ==, 2);
    d = manifest_disk(m, "disk0");
    g_assert_cmpuint(d->size, ==, 64 << 20);
    g_assert_cmpint(d->mode, ==, MANIFEST_INCREMENTAL);
    g_assert_cmpstr(d->parent, ==, "20261129T120000Z");
    g_assert_cmpint(d->format, ==, REPO_QCOW2);
    g_assert_false(d->compressed);
    g_assert_cmpstr(d->checksum, ==, SUM);
    d = manifest_disk(m, "disk2");
    g_assert_cmpint(d->format, ==, REPO_RAW);
    g_assert_null(d->parent);
    g_assert_null(manifest_disk(m, "disk1"));
    /* a partial manifest may not say complete, nor a complete one not */
    g_assert_null(manifest_parse(good_manifest, strlen(good_manifest), ID, true,
                                 "p.json", NULL));
}

/* good_manifest with FROM replaced by TO (once). */
static char *edit(const char *from, const char *to)
{
    const char *at = strstr(good_manifest, from);

    g_assert_nonnull(at);
    return g_strdup_printf("%.*s%s%s", (int)(at - good_manifest), good_manifest,
                           to, at + strlen(from));
}

static void test_manifest_hostile(void)
{
    static const char *const cases[][2] = {
        /* paths that are not the layout's: refused, not followed */
        { "\"disks/disk0/" ID ".qcow2\"", "\"/etc/shadow\"" },
        { "\"disks/disk0/" ID ".qcow2\"", "\"disks/disk0/../../x.qcow2\"" },
        { "\"disks/disk0/" ID ".digests\"", "\"../outside.digests\"" },
        /* names that leave their directory */
        { "\"disk\": \"disk0\"", "\"disk\": \"../etc\"" },
        { "\"disk\": \"disk0\"", "\"disk\": \"a/b\"" },
        { "\"parent\": \"20261129T120000Z\"", "\"parent\": \"../x\"" },
        /* a parent that is itself, bitmaps that are not this backup's */
        { "\"parent\": \"20261129T120000Z\"", "\"parent\": \"" ID "\"" },
        { "\"qbk-000002-" ID "\"", "\"qbk-000001-monday\"" },
        { "\"qbk-since-" ID "-0\"", "\"qbk-000001-monday\"" },
        /* types and values */
        { "\"size\": 67108864", "\"size\": -1" },
        { "\"size\": 67108864", "\"size\": 0" },
        { "\"size\": 67108864", "\"size\": \"big\"" },
        { "\"size\": 67108864", "\"size\": 1.5" },
        { "\"mode\": \"incremental\"", "\"mode\": \"sometimes\"" },
        { "\"mode\": \"incremental\"", "\"mode\": \"full\"" },
        { "\"format\": \"qcow2\"", "\"format\": \"vmdk\"" },
        { "\"format\": \"qcow2\"", "\"format\": \"raw\"" },
        /* compression: zstd, of a qcow2, or nothing */
        { "\"format\": \"qcow2\"",
          "\"format\": \"qcow2\", \"compression\": \"lzma\"" },
        { "\"format\": \"qcow2\"",
          "\"format\": \"qcow2\", \"compression\": true" },
        { "\"format\": \"raw\"",
          "\"format\": \"raw\", \"compression\": \"zstd\"" },
        { "\"checkpointed\": true", "\"checkpointed\": \"yes\"" },
        { "\"value\": \"" SUM "\"", "\"value\": \"xyz\"" },
        { "\"id\": \"" ID "\"", "\"id\": \"20991231T000000Z\"" },
        { "\"status\": \"complete\"", "\"status\": \"done\"" },
        { "\"created\": \"2026-11-30T12:00:00Z\"", "\"created\": \"never\"" },
        { "\"format\": \"qbk-manifest-1\"", "\"format\": \"qbk-manifest-9\"" },
        /* the disks array in every wrong shape */
        { "\"disks\": [{", "\"disks\": null, \"x\": [{" },
        { "\"disks\": [{", "\"disks\": {}, \"x\": [{" },
        { "\"disks\": [{", "\"disks\": \"disk0\", \"x\": [{" },
        { "\"disks\": [{", "\"x\": [{" },
        { "\"disks\": [{", "\"disks\": [1, {" },
        { "\"disk\": \"disk2\"", "\"disk\": \"disk0\"" },
        { "{\"disk\": \"disk2\", ", "{" },
    };

    for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *text = edit(cases[i][0], cases[i][1]);
        g_autoptr(GError) error = NULL;
        Manifest *m = parse(text, &error);

        if (m) {
            g_printerr("accepted: %s -> %s\n", cases[i][0], cases[i][1]);
        }
        g_assert_null(m);
        g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
        g_assert_nonnull(strstr(error->message, "m.json"));
    }
    /* not JSON, not one object */
    {
        const char *texts[] = { "",          "{",     "[]",   "null",
                                "{\"id\": ", "{} {}", "\"x\"" };

        for (guint i = 0; i < G_N_ELEMENTS(texts); i++) {
            g_autoptr(GError) error = NULL;

            g_assert_null(parse(texts[i], &error));
            g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
        }
    }
    /* a NUL inside */
    g_assert_null(manifest_parse("{\"id\": \"a\\u0000b\"}", 18, ID, false,
                                 "m.json", NULL));
}

/* ---- the merge journal ---- */

static void test_journal(void)
{
    static const char *const bad[] = {
        "{\"journal\": \"qbk-merge-journal-1\", \"disk\": \"../x\", \"to\": "
        "\"a\", \"format\": \"qcow2\", \"old_format\": \"qcow2\", \"drop\": "
        "[]}",
        "{\"journal\": \"qbk-merge-journal-1\", \"disk\": \"d\", \"to\": "
        "\"a\", "
        "\"format\": \"qcow2\", \"old_format\": \"qcow2\", \"drop\": [\"a\"]}",
        "{\"journal\": \"qbk-merge-journal-1\", \"disk\": \"d\", \"to\": "
        "\"a\", "
        "\"parent\": \"a\", \"format\": \"qcow2\", \"old_format\": \"qcow2\", "
        "\"drop\": []}",
        "{\"journal\": \"qbk-merge-journal-1\", \"disk\": \"d\", \"to\": "
        "\"a\", "
        "\"format\": \"qcow2\", \"old_format\": \"qcow2\", \"drop\": [7]}",
        "{\"journal\": \"qbk-merge-journal-1\", \"disk\": \"d\", \"to\": "
        "\"a\", "
        "\"format\": \"qcow2\", \"drop\": []}",
        "{\"journal\": \"other\", \"disk\": \"d\", \"to\": \"a\", \"format\": "
        "\"qcow2\", \"old_format\": \"qcow2\", \"drop\": []}",
        "{\"disk\": \"d\", \"to\": \"a\", \"format\": \"qcow2\"}",
        "{\"disk\": \"d\", \"to\": \"a\", \"format\": \"raw\", \"old_image\": "
        "\"/etc/passwd\", \"drop\": []}",
        "{\"journal\": \"qbk-merge-journal-1\", \"disk\": \"d\", \"to\": "
        "\"a\", \"format\": \"qcow2\", \"old_format\": \"qcow2\", "
        "\"digests_layout\": \"dense\", \"drop\": []}",
    };
    /* the first qbk-merge's journal: paths in it are ignored */
    const char *old =
        "{\"id\": \"b\", \"disk\": \"d\", \"to\": \"b\", \"parent\": \"a\", "
        "\"format\": \"qcow2\", \"new_image\": \"/etc/shadow\", \"image\": "
        "\"/etc/passwd\", \"new_digests\": \"x\", \"digests\": \"y\", "
        "\"drop\": [\"c\"]}";
    g_autoptr(MergeJournal) j = merge_journal_parse(old, strlen(old), NULL);

    g_assert_nonnull(j);
    g_assert_cmpstr(j->to, ==, "b");
    g_assert_cmpstr(j->parent, ==, "a");
    g_assert_cmpint(j->old_format, ==, REPO_QCOW2);
    g_assert_cmpuint(j->drop->len, ==, 1);
    g_assert_false(j->digests_sparse); /* written before sparse digests */
    for (guint i = 0; i < G_N_ELEMENTS(bad); i++) {
        g_autoptr(GError) error = NULL;

        g_assert_null(merge_journal_parse(bad[i], strlen(bad[i]), &error));
        g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
    }
}

/* ---- qcow2 headers ---- */

static void put32(guint8 *p, guint32 v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static void put64(guint8 *p, guint64 v)
{
    put32(p, v >> 32);
    put32(p + 4, (guint32)v);
}

/* A v3 header with BACKING at 512 and a backing format extension. */
static guint8 *header(const char *backing, const char *fmt, size_t *len)
{
    guint8 *b = g_malloc0(65536);

    put32(b, 0x514649fb);
    put32(b + 4, 3);
    if (backing) {
        put64(b + 8, 512);
        put32(b + 16, strlen(backing));
        memcpy(b + 512, backing, strlen(backing));
    }
    put32(b + 20, 16);
    put64(b + 24, 64 << 20);
    put32(b + 96, 4);
    put32(b + 100, 112);
    if (fmt) {
        put32(b + 112, 0xe2792aca);
        put32(b + 116, strlen(fmt));
        memcpy(b + 120, fmt, strlen(fmt));
        /* then the end: zeros */
    }
    *len = 65536;
    return b;
}

static void test_qcow2_header(void)
{
    size_t len;
    g_autofree guint8 *b = header("parent.qcow2", "qcow2", &len);
    Qcow2Header h;

    g_assert_true(qcow2_header_parse(b, len, &h, NULL));
    g_assert_cmpstr(h.backing, ==, "parent.qcow2");
    g_assert_cmpstr(h.backing_format, ==, "qcow2");
    g_assert_false(h.data_file);
    g_assert_cmpuint(h.size, ==, 64 << 20);
    qcow2_header_clear(&h);

    /* an external data file, by feature bit or by extension */
    put64(b + 72, 1u << 2);
    g_assert_true(qcow2_header_parse(b, len, &h, NULL));
    g_assert_true(h.data_file);
    qcow2_header_clear(&h);
    put64(b + 72, 0);
    put32(b + 112, 0x44415441);
    g_assert_true(qcow2_header_parse(b, len, &h, NULL));
    g_assert_true(h.data_file);
    qcow2_header_clear(&h);

    /* a backing name past the cluster, an extension running off it, a
     * name with a NUL, short input, another magic */
    put32(b + 112, 0xe2792aca);
    put64(b + 8, 65530);
    g_assert_false(qcow2_header_parse(b, len, &h, NULL));
    put64(b + 8, 512);
    put32(b + 116, 0xfffffff0);
    g_assert_false(qcow2_header_parse(b, len, &h, NULL));
    put32(b + 116, 5);
    b[514] = '\0';
    g_assert_false(qcow2_header_parse(b, len, &h, NULL));
    g_assert_false(qcow2_header_parse(b, 50, &h, NULL));
    b[0] = 'X';
    g_assert_false(qcow2_header_parse(b, len, &h, NULL));
}

/* ---- a repository on disk ---- */

typedef struct {
    char *dir;
    Repo *repo;
} Fixture;

static void write_file(const char *dir, const char *name, const char *text)
{
    g_autofree char *path = g_build_filename(dir, name, NULL);

    g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

/* A complete manifest of backup ID whose disk0 stands on PARENT. */
static char *manifest_text(const char *id, const char *parent)
{
    return g_strdup_printf(
        "{\"format\": \"qbk-manifest-1\", \"id\": \"%s\", \"status\": "
        "\"complete\", \"created\": \"2026-11-30T12:00:00Z\", \"disks\": "
        "[{\"disk\": \"disk0\", \"size\": 65536, \"mode\": \"%s\", "
        "\"parent\": %s%s%s, \"checksum\": {\"algorithm\": "
        "\"xxh3-128-blocks-64k\", \"value\": \"" SUM "\"}}]}",
        id, parent ? "incremental" : "full", parent ? "\"" : "",
        parent ? parent : "null", parent ? "\"" : "");
}

static void fixture_setup(Fixture *f, gconstpointer unused)
{
    g_autoptr(GError) error = NULL;

    f->dir = g_dir_make_tmp("qbk-test-repo-XXXXXX", NULL);
    f->repo = repo_open(f->dir, REPO_OPEN_CREATE, &error);
    g_assert_no_error(error);
}

static void fixture_teardown(Fixture *f, gconstpointer unused)
{
    g_autofree char *cmd =
        g_strdup_printf("rm -rf '%s' '%s.key'", f->dir, f->dir);

    repo_free(f->repo);
    g_assert_cmpint(system(cmd), ==, 0);
    g_free(f->dir);
}

/* A journal says which digests its merge wrote; one from a qbk before
 * sparse digests says nothing, and they are dense. */
static void test_journal_layout(Fixture *f, gconstpointer unused)
{
    g_autoptr(MergeJournal) j = merge_journal_new();
    g_autoptr(GError) error = NULL;

    j->disk = g_strdup("d");
    j->to = g_strdup("b");
    j->format = j->old_format = REPO_QCOW2;
    for (int sparse = 0; sparse <= 1; sparse++) {
        g_autoptr(MergeJournal) back = NULL;

        j->digests_sparse = sparse;
        g_assert_true(repo_write_journal(f->repo, j, &error));
        back = repo_read_journal(f->repo, &error);
        g_assert_no_error(error);
        g_assert_nonnull(back);
        g_assert_cmpint(back->digests_sparse, ==, sparse);
    }
    g_assert_true(repo_remove_journal(f->repo, &error));
}

static void test_owner_only(Fixture *f, gconstpointer unused)
{
    g_autofree char *backups = g_build_filename(f->dir, "backups", NULL);
    g_autofree char *marker = g_build_filename(f->dir, "qbk-repo.json", NULL);
    struct stat st;

    g_assert_cmpint(stat(f->dir, &st), ==, 0);
    g_assert_cmpint(st.st_mode & 0777, ==, 0700);
    g_assert_cmpint(stat(backups, &st), ==, 0);
    g_assert_cmpint(st.st_mode & 0777, ==, 0700);
    g_assert_cmpint(stat(marker, &st), ==, 0);
    g_assert_cmpint(st.st_mode & 0777, ==, 0600);
}

/* RFC 8018's PBKDF2 with HMAC-SHA-256, against its published vectors. */
static void test_pbkdf2(void)
{
    static const struct {
        guint rounds;
        const char *hex;
    } vectors[] = {
        { 1,
          "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b" },
        { 2,
          "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43" },
        { 4096,
          "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a" },
    };

    for (guint i = 0; i < G_N_ELEMENTS(vectors); i++) {
        guint8 out[32];
        GString *hex = g_string_new(NULL);

        repo_pbkdf2_sha256((const guint8 *)"password", 8,
                           (const guint8 *)"salt", 4, vectors[i].rounds, out);
        for (guint j = 0; j < sizeof(out); j++) {
            g_string_append_printf(hex, "%02x", out[j]);
        }
        g_assert_cmpstr(hex->str, ==, vectors[i].hex);
        g_string_free(hex, TRUE);
    }
}

/* A key adopted once; the same key again; another refused; a damaged
 * fingerprint refused as corrupt; files that cannot be keys refused. */
static void test_key(Fixture *f, gconstpointer unused)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *key = g_strconcat(f->dir, ".key", NULL);
    g_autofree char *json = g_build_filename(f->dir, "key.json", NULL);
    g_autofree char *text = NULL;

    g_assert_true(g_file_set_contents(key, "correct horse", -1, NULL));
    g_assert_cmpint(chmod(key, 0600), ==, 0);
    g_assert_false(repo_encrypted(f->repo));
    g_assert_false(repo_key_check(f->repo, key, false, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_KEY);
    g_clear_error(&error);
    g_assert_true(repo_key_check(f->repo, key, true, &error));
    g_assert_no_error(error);
    g_assert_true(repo_encrypted(f->repo));
    g_assert_nonnull(repo_key_file(f->repo));
    /* the key itself is nowhere in the record */
    g_assert_true(g_file_get_contents(json, &text, NULL, NULL));
    g_assert_null(strstr(text, "correct horse"));
    g_assert_true(repo_key_check(f->repo, key, false, &error));
    /* another passphrase, one byte more */
    g_assert_true(g_file_set_contents(key, "correct horse\n", -1, NULL));
    g_assert_cmpint(chmod(key, 0600), ==, 0);
    g_assert_false(repo_key_check(f->repo, key, false, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_KEY);
    g_clear_error(&error);
    /* open to others, empty, not text */
    g_assert_true(g_file_set_contents(key, "correct horse", -1, NULL));
    g_assert_cmpint(chmod(key, 0640), ==, 0);
    g_assert_false(repo_key_check(f->repo, key, false, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_KEY);
    g_clear_error(&error);
    g_assert_true(g_file_set_contents(key, "", 0, NULL));
    g_assert_cmpint(chmod(key, 0600), ==, 0);
    g_assert_false(repo_key_check(f->repo, key, false, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_KEY);
    g_clear_error(&error);
    g_assert_true(g_file_set_contents(key, "\xff\xfe", 2, NULL));
    g_assert_cmpint(chmod(key, 0600), ==, 0);
    g_assert_false(repo_key_check(f->repo, key, false, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_KEY);
    g_clear_error(&error);
    /* a damaged fingerprint: corrupt, not a wrong key */
    g_assert_true(g_file_set_contents(key, "correct horse", -1, NULL));
    g_assert_cmpint(chmod(key, 0600), ==, 0);
    g_assert_true(g_file_set_contents(
        json,
        "{\"encryption\": \"luks\", \"kdf\": \"pbkdf2-hmac-sha256\", "
        "\"iterations\": 1, \"salt\": \"00\", \"fingerprint\": \"00\"}",
        -1, NULL));
    g_assert_false(repo_key_check(f->repo, key, false, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
    unlink(key);
}

static void test_chain_loops(Fixture *f, gconstpointer unused)
{
    g_autofree char *backups = g_build_filename(f->dir, "backups", NULL);
    g_autofree char *a = manifest_text("a", "b");
    g_autofree char *b = manifest_text("b", "c");
    g_autofree char *c = manifest_text("c", "a");
    g_autofree char *d = manifest_text("d", "nosuch");
    g_autoptr(GError) error = NULL;
    GPtrArray *chain;

    write_file(backups, "a.json", a);
    write_file(backups, "b.json", b);
    write_file(backups, "c.json", c);
    write_file(backups, "d.json", d);
    chain = repo_chain(f->repo, "a", "disk0", &error);
    g_assert_null(chain);
    g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
    g_assert_nonnull(strstr(error->message, "loops"));
    g_clear_error(&error);
    g_assert_null(repo_chain(f->repo, "d", "disk0", &error));
    g_assert_nonnull(strstr(error->message, "is missing or unreadable"));
    g_clear_error(&error);
    g_assert_null(repo_chain(f->repo, "a", "disk9", &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_NOT_FOUND);
}

static void test_list_skips_bad_files(Fixture *f, gconstpointer unused)
{
    g_autofree char *backups = g_build_filename(f->dir, "backups", NULL);
    g_autofree char *good = manifest_text("g", NULL);
    g_autofree char *link = g_build_filename(backups, "l.json", NULL);
    g_autoptr(GPtrArray) skipped = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) list = NULL;

    write_file(backups, "g.json", good);
    write_file(backups, "stray.json", "{\"id\": 1}");
    write_file(backups, "..json", "{}");
    write_file(backups, "x.json", good); /* says it is "g" */
    g_assert_cmpint(symlink("/etc/passwd", link), ==, 0);
    list = repo_list(f->repo, false, skipped, NULL);
    g_assert_cmpuint(list->len, ==, 1);
    g_assert_cmpstr(((Manifest *)list->pdata[0])->id, ==, "g");
    g_assert_cmpuint(skipped->len, ==, 4);
}

static void test_symlinks_refused(Fixture *f, gconstpointer unused)
{
    g_autofree char *disks = g_build_filename(f->dir, "disks", NULL);
    g_autofree char *evil = g_build_filename(disks, "disk0", NULL);
    g_autofree char *backups = g_build_filename(f->dir, "backups", NULL);
    g_autoptr(GError) error = NULL;
    Repo *r;

    /* a disk directory that leads elsewhere */
    g_assert_cmpint(symlink("/tmp", evil), ==, 0);
    r = repo_open(f->dir, 0, &error);
    g_assert_null(r);
    g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
    g_assert_nonnull(strstr(error->message, "symbolic link"));
    g_clear_error(&error);
    unlink(evil);
    g_assert_true(repo_make_disk_dir(f->repo, "disk0", NULL));
    /* so does backups/ */
    g_assert_cmpint(rename(backups, evil), ==, 0); /* keep it out of sight */
    g_assert_cmpint(symlink("/tmp", backups), ==, 0);
    g_assert_null(repo_open(f->dir, REPO_OPEN_CREATE, &error));
    g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
    unlink(backups);
}

static void test_create_file_replaces_links(Fixture *f, gconstpointer unused)
{
    g_autofree char *victim = g_build_filename(f->dir, "victim", NULL);
    g_autofree char *path = g_build_filename(f->dir, "backups", "x.tmp", NULL);
    g_autofree char *text = NULL;
    int fd;

    write_file(f->dir, "victim", "keep me");
    g_assert_cmpint(symlink(victim, path), ==, 0);
    fd = repo_create_file(path, NULL);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(write(fd, "new", 3), ==, 3);
    close(fd);
    g_assert_true(g_file_get_contents(victim, &text, NULL, NULL));
    g_assert_cmpstr(text, ==, "keep me");
    /* and a link is never read through */
    unlink(path);
    g_assert_cmpint(symlink(victim, path), ==, 0);
    g_assert_cmpint(repo_open_file(path, NULL), ==, -1);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/repo/names", test_names);
    g_test_add_func("/repo/manifest/good", test_manifest_good);
    g_test_add_func("/repo/manifest/hostile", test_manifest_hostile);
    g_test_add_func("/repo/journal", test_journal);
    g_test_add("/repo/journal-layout", Fixture, NULL, fixture_setup,
               test_journal_layout, fixture_teardown);
    g_test_add_func("/repo/qcow2-header", test_qcow2_header);
    g_test_add_func("/repo/pbkdf2", test_pbkdf2);
    g_test_add("/repo/key", Fixture, NULL, fixture_setup, test_key,
               fixture_teardown);
    g_test_add("/repo/owner-only", Fixture, NULL, fixture_setup,
               test_owner_only, fixture_teardown);
    g_test_add("/repo/chain-loops", Fixture, NULL, fixture_setup,
               test_chain_loops, fixture_teardown);
    g_test_add("/repo/list-skips-bad-files", Fixture, NULL, fixture_setup,
               test_list_skips_bad_files, fixture_teardown);
    g_test_add("/repo/symlinks-refused", Fixture, NULL, fixture_setup,
               test_symlinks_refused, fixture_teardown);
    g_test_add("/repo/create-file-replaces-links", Fixture, NULL, fixture_setup,
               test_create_file_replaces_links, fixture_teardown);
    return g_test_run();
}
