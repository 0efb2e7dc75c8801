/*
 * lib/backup's pure logic and crash recovery, without a VM: the retention
 * plan (what a policy keeps, what is merged into what), what each disk's
 * backup is (full, or on which parent, and why not), and the merge
 * journal's roll-forward on a repository of real qcow2 chains (qemu-img),
 * including a journal that does not describe a merge of the repository.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/backup/internal.h"

#define SUM "00112233445566778899aabbccddeeff"

/* A complete manifest: backup ID at CREATED, its disk d0 of SIZE bytes on
 * PARENT (NULL: a full); with a checkpoint on d0 (bitmap qbk-<SEQ>-ID)
 * unless SEQ is 0. */
static Manifest *make_manifest(const char *id, const char *created,
                               const char *parent, const char *mode,
                               guint64 size, guint seq)
{
    json_object *o = json_object_new_object();
    json_object *disks = json_object_new_array();
    json_object *d = json_object_new_object();
    json_object *sum = json_object_new_object();
    g_autoptr(GError) error = NULL;
    const char *text;
    Manifest *m;

    qmp_json_set_string(o, "format", "qbk-manifest-1");
    qmp_json_set_string(o, "id", id);
    qmp_json_set_string(o, "status", "complete");
    qmp_json_set_string(o, "created", created);
    if (seq) {
        g_autofree char *bitmap = g_strdup_printf("qbk-%06u-%s", seq, id);

        qmp_json_set_string(o, "checkpoint", id);
        qmp_json_set_string(o, "checkpoint_bitmap", bitmap);
    }
    qmp_json_set_string(d, "disk", "d0");
    qmp_json_set_uint(d, "size", size);
    qmp_json_set_string(d, "mode", mode);
    qmp_json_set_string(d, "parent", parent);
    qmp_json_set_bool(d, "checkpointed", seq != 0);
    qmp_json_set_string(sum, "algorithm", "xxh3-128-blocks-64k");
    qmp_json_set_string(sum, "value", SUM);
    json_object_object_add(d, "checksum", sum);
    json_object_array_add(disks, d);
    json_object_object_add(o, "disks", disks);
    text = json_object_to_json_string(o);
    m = manifest_parse(text, strlen(text), id, false, id, &error);
    g_assert_no_error(error);
    json_object_put(o);
    return m;
}

static Manifest *manifest(const char *id, const char *created,
                          const char *parent, const char *mode)
{
    return make_manifest(id, created, parent, mode, 1048576, 0);
}

static char *plan_of(GPtrArray *ms, guint daily, guint weekly, guint monthly)
{
    BackupRetention policy = { daily, weekly, monthly };
    json_object *plan = retention_plan(ms, &policy);
    json_object *brief = json_object_new_object();
    const char *keys[] = { "keep", "remove" };
    char *text;

    /* ids only, and the merges as they are */
    for (guint k = 0; k < G_N_ELEMENTS(keys); k++) {
        json_object *list = json_object_new_array();
        json_object *from = qmp_json_array(plan, keys[k]);

        for (size_t i = 0; i < qmp_json_length(from); i++) {
            json_object_array_add(list, json_object_new_string(qmp_json_string(
                                            qmp_json_index(from, i), "id")));
        }
        json_object_object_add(brief, keys[k], list);
    }
    json_object_object_add(brief, "merges",
                           json_object_get(qmp_json_array(plan, "merges")));
    text =
        g_strdup(json_object_to_json_string_ext(brief, JSON_C_TO_STRING_PLAIN));
    json_object_put(brief);
    json_object_put(plan);
    return text;
}

static void test_retention_chain(void)
{
    g_autoptr(GPtrArray) ms =
        g_ptr_array_new_with_free_func((GDestroyNotify)manifest_unref);
    g_autofree char *plan = NULL;

    /* listed by id, planned by time: ids do not sort as times here */
    g_ptr_array_add(ms,
                    manifest("d", "2026-11-03T10:00:00Z", "c", "incremental"));
    g_ptr_array_add(ms, manifest("a", "2026-11-01T08:00:00Z", NULL, "full"));
    g_ptr_array_add(ms,
                    manifest("b", "2026-11-01T09:00:00Z", "a", "incremental"));
    g_ptr_array_add(ms,
                    manifest("c", "2026-11-02T10:00:00Z", "b", "incremental"));
    plan = plan_of(ms, 2, 0, 0);
    /* the newest of the last two days; a..b merge into c, a full */
    g_assert_cmpstr(plan, ==,
                    "{\"keep\":[\"c\",\"d\"],\"remove\":[\"a\",\"b\"],"
                    "\"merges\":[{\"disk\":\"d0\",\"merge\":\"a\",\"into\":"
                    "\"c\"}]}");
    g_free(plan);
    plan = plan_of(ms, 0, 0, 0); /* only the newest */
    g_assert_cmpstr(plan, ==,
                    "{\"keep\":[\"d\"],\"remove\":[\"a\",\"b\",\"c\"],"
                    "\"merges\":[{\"disk\":\"d0\",\"merge\":\"a\",\"into\":"
                    "\"d\"}]}");
}

static void test_retention_shared_full(void)
{
    g_autoptr(GPtrArray) ms =
        g_ptr_array_new_with_free_func((GDestroyNotify)manifest_unref);
    g_autofree char *plan = NULL;

    /* two differentials stand on one full: it stays, and nothing merges */
    g_ptr_array_add(ms, manifest("f", "2026-10-01T08:00:00Z", NULL, "full"));
    g_ptr_array_add(ms,
                    manifest("x", "2026-11-02T08:00:00Z", "f", "differential"));
    g_ptr_array_add(ms,
                    manifest("y", "2026-11-03T08:00:00Z", "f", "differential"));
    plan = plan_of(ms, 2, 0, 0);
    g_assert_cmpstr(plan, ==,
                    "{\"keep\":[\"f\",\"x\",\"y\"],\"remove\":[],\"merges\":"
                    "[]}");
    g_free(plan);
    /* weekly and monthly periods: ISO weeks, months */
    plan = plan_of(ms, 0, 0, 2);
    g_assert_cmpstr(plan, ==,
                    "{\"keep\":[\"f\",\"y\"],\"remove\":[\"x\"],\"merges\":"
                    "[]}");
}

/* ---- the merge journal on a repository of real chains ---- */

typedef struct {
    char *dir;
    Repo *repo;
} Fixture;

static void run(const char *cwd, const char *fmt, ...)
{
    g_autofree char *cmd = NULL;
    g_autofree char *full = NULL;
    va_list ap;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    full = g_strdup_printf("cd '%s' && %s", cwd, cmd);
    g_assert_cmpint(system(full), ==, 0);
}

static void put_manifest(Fixture *f, const char *id, const char *parent)
{
    g_autofree char *path = repo_manifest_path(f->repo, id);
    g_autoptr(Manifest) m = manifest(id, "2026-11-01T08:00:00Z", parent,
                                     parent ? "incremental" : "full");

    g_assert_true(repo_write_json(path, m->json, NULL));
}

/* A repository with d0's chain full <- inc1 <- inc2, and the state of a
 * merge of inc1 into inc2 killed just after its journal was written. */
static void fixture_setup(Fixture *f, gconstpointer unused)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *disk = NULL;

    f->dir = g_dir_make_tmp("qbk-test-backup-XXXXXX", NULL);
    f->repo = repo_open(f->dir, REPO_OPEN_CREATE, &error);
    g_assert_no_error(error);
    g_assert_true(repo_make_disk_dir(f->repo, "d0", NULL));
    disk = repo_disk_dir(f->repo, "d0");
    run(disk,
        "qemu-img create -q -f qcow2 full.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 inc1.qcow2 && "
        "qemu-img create -q -f qcow2 -b inc1.qcow2 -F qcow2 inc2.qcow2 && "
        "qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 "
        "inc2.merging.qcow2 && "
        "for f in full inc1 inc2 inc2.merging; do "
        "head -c 256 /dev/zero >$f.digests; done");
    put_manifest(f, "full", NULL);
    put_manifest(f, "inc1", "full");
    put_manifest(f, "inc2", "inc1");
}

static void fixture_teardown(Fixture *f, gconstpointer unused)
{
    g_autofree char *cmd = g_strdup_printf("rm -rf '%s'", f->dir);

    repo_free(f->repo);
    g_assert_cmpint(system(cmd), ==, 0);
    g_free(f->dir);
}

static MergeJournal *journal(const char *to, const char *parent,
                             const char *drop)
{
    MergeJournal *j = merge_journal_new();

    j->disk = g_strdup("d0");
    j->to = g_strdup(to);
    j->parent = g_strdup(parent);
    if (drop) {
        g_ptr_array_add(j->drop, g_strdup(drop));
    }
    return j;
}

static char *backing_of(Fixture *f, const char *id)
{
    g_autofree char *path = repo_image_path(f->repo, "d0", id, REPO_QCOW2);
    int fd = repo_open_file(path, NULL);
    Qcow2Header h;
    char *backing;

    g_assert_cmpint(fd, >=, 0);
    g_assert_true(qcow2_header_read(fd, &h, NULL));
    close(fd);
    backing = g_strdup(h.backing);
    qcow2_header_clear(&h);
    return backing;
}

static void test_roll_forward(Fixture *f, gconstpointer unused)
{
    g_autoptr(MergeJournal) j = journal("inc2", "full", "inc1");
    g_autoptr(GError) error = NULL;
    g_autoptr(Manifest) m = NULL;
    g_autofree char *backing = NULL;
    g_autofree char *inc1 = repo_manifest_path(f->repo, "inc1");
    g_autofree char *img1 = repo_image_path(f->repo, "d0", "inc1", REPO_QCOW2);
    g_autofree char *jpath = repo_journal_path(f->repo);

    g_assert_true(repo_write_journal(f->repo, j, NULL));
    /* twice: every step is idempotent */
    for (int pass = 0; pass < 2; pass++) {
        g_assert_true(backup_merge_recover(f->repo, &error));
        g_assert_no_error(error);
        m = repo_load(f->repo, "inc2", &error);
        g_assert_no_error(error);
        g_assert_cmpstr(manifest_disk(m, "d0")->parent, ==, "full");
        g_clear_pointer(&m, manifest_unref);
        g_assert_false(g_file_test(inc1, G_FILE_TEST_EXISTS));
        g_assert_false(g_file_test(img1, G_FILE_TEST_EXISTS));
        g_assert_false(g_file_test(jpath, G_FILE_TEST_EXISTS));
        g_free(backing);
        backing = backing_of(f, "inc2");
        g_assert_cmpstr(backing, ==, "full.qcow2");
        if (pass == 0) {
            /* as if killed after the manifest step: the journal again */
            g_assert_true(repo_write_journal(f->repo, j, NULL));
        }
    }
}

static void test_journal_refused(Fixture *f, gconstpointer unused)
{
    /* valid names, but no merge of this repository: dropping the full,
     * or standing on a backup that is not an ancestor */
    g_autoptr(MergeJournal) drop_full = journal("inc2", "inc1", "full");
    g_autoptr(MergeJournal) stranger = journal("inc1", "inc2", NULL);
    g_autoptr(MergeJournal) no_image = journal("inc1", NULL, NULL);
    MergeJournal *bad[] = { drop_full, stranger, no_image };

    for (guint i = 0; i < G_N_ELEMENTS(bad); i++) {
        g_autoptr(GError) error = NULL;
        g_autoptr(Manifest) m = NULL;

        g_assert_true(repo_write_journal(f->repo, bad[i], NULL));
        g_assert_false(backup_merge_recover(f->repo, &error));
        g_assert_error(error, REPO_ERROR, REPO_ERROR_CORRUPT);
        /* nothing changed */
        m = repo_load(f->repo, "inc2", NULL);
        g_assert_cmpstr(manifest_disk(m, "d0")->parent, ==, "inc1");
        g_clear_pointer(&m, manifest_unref);
        m = repo_load(f->repo, "full", NULL);
        g_assert_nonnull(m);
    }
}

/* ---- what each disk's backup is (disk_plan) ---- */

#define MIB (1024 * 1024)

/* Backup ID of disk d0 (SIZE bytes) at checkpoint ID, bitmap
 * qbk-<SEQ>-ID (none if !CHECKPOINTED), on PARENT (NULL: a full). */
static Manifest *cp_manifest(const char *id, guint seq, const char *parent,
                             const char *mode, guint64 size, bool checkpointed)
{
    g_autofree char *created = g_strdup_printf("2026-11-0%uT00:00:00Z", seq);
    Manifest *m = make_manifest(id, created, parent, mode, size, seq);

    if (!checkpointed) { /* the backup has one, this disk did not get it */
        ((ManifestDisk *)m->disks->pdata[0])->checkpointed = false;
    }
    return m;
}

typedef struct {
    GPtrArray *backups; /* Manifest*: full A (1), incremental B (2) on A */
    QmpDisk disk;       /* d0, 64 MiB */
    QmpBitmap bitmaps[2];
    BitmapDiskVerdict verdict; /* the VM: both checkpoints, trusted */
    DiskPlan plan;
} PlanFixture;

static void plan_setup(PlanFixture *f, gconstpointer unused)
{
    (void)unused;
    f->backups = g_ptr_array_new_with_free_func((GDestroyNotify)manifest_unref);
    g_ptr_array_add(f->backups,
                    cp_manifest("A", 1, NULL, "full", 64 * MIB, true));
    g_ptr_array_add(f->backups,
                    cp_manifest("B", 2, "A", "incremental", 64 * MIB, true));
    f->disk = (QmpDisk){ .id = "d0", .node = "d0-fmt", .size = 64 * MIB };
    f->bitmaps[0] = (QmpBitmap){ .name = "qbk-000001-A", .persistent = true };
    f->bitmaps[1] = (QmpBitmap){ .name = "qbk-000002-B",
                                 .persistent = true,
                                 .recording = true };
    f->verdict.disk = &f->disk;
    f->verdict.chain = g_ptr_array_new();
    g_ptr_array_add(f->verdict.chain, &f->bitmaps[0]);
    g_ptr_array_add(f->verdict.chain, &f->bitmaps[1]);
}

static void plan_teardown(PlanFixture *f, gconstpointer unused)
{
    (void)unused;
    g_free(f->plan.why);
    g_ptr_array_unref(f->verdict.chain);
    g_ptr_array_unref(f->backups);
}

/* Plan for MODE since SINCE; whether it was no fallback. */
static bool plan(PlanFixture *f, BackupMode mode, const char *since)
{
    g_clear_pointer(&f->plan.why, g_free);
    return disk_plan(mode, since, &f->disk, f->backups, &f->verdict, &f->plan);
}

static void test_plan_chain(PlanFixture *f, gconstpointer unused)
{
    (void)unused;
    /* auto and incremental: on the newest backup, since its checkpoint */
    g_assert_true(plan(f, BACKUP_MODE_AUTO, NULL));
    g_assert_cmpint(f->plan.mode, ==, BACKUP_MODE_INCREMENTAL);
    g_assert_cmpstr(f->plan.parent->id, ==, "B");
    g_assert_cmpstr(f->plan.why, ==, "changes since checkpoint 'B'");
    g_assert_true(plan(f, BACKUP_MODE_INCREMENTAL, NULL));
    g_assert_cmpstr(f->plan.parent->id, ==, "B");
    /* differential: on the newest full */
    g_assert_true(plan(f, BACKUP_MODE_DIFFERENTIAL, NULL));
    g_assert_cmpint(f->plan.mode, ==, BACKUP_MODE_DIFFERENTIAL);
    g_assert_cmpstr(f->plan.parent->id, ==, "A");
    /* --since: by checkpoint name, backup id or bitmap */
    g_assert_true(plan(f, BACKUP_MODE_AUTO, "A"));
    g_assert_cmpstr(f->plan.parent->id, ==, "A");
    g_assert_true(plan(f, BACKUP_MODE_INCREMENTAL, "qbk-000002-B"));
    g_assert_cmpstr(f->plan.parent->id, ==, "B");
    /* full: asked for, never a fallback */
    g_assert_true(plan(f, BACKUP_MODE_FULL, NULL));
    g_assert_cmpint(f->plan.mode, ==, BACKUP_MODE_FULL);
    g_assert_null(f->plan.parent);
    g_assert_false(f->plan.fallback);
    g_assert_cmpstr(f->plan.why, ==, "asked for");
}

/* Each reason a chain cannot be used: a fallback to full, saying why. */
static void test_plan_fallbacks(PlanFixture *f, gconstpointer unused)
{
    (void)unused;
    g_assert_false(plan(f, BACKUP_MODE_AUTO, "nosuch"));
    g_assert_cmpint(f->plan.mode, ==, BACKUP_MODE_FULL);
    g_assert_true(f->plan.fallback);
    g_assert_null(f->plan.parent);
    g_assert_cmpstr(f->plan.why, ==, "no backup of it at that checkpoint");

    /* the newest checkpoint is gone from the VM */
    g_ptr_array_remove_index(f->verdict.chain, 1);
    g_assert_false(plan(f, BACKUP_MODE_INCREMENTAL, NULL));
    g_assert_cmpstr(f->plan.why, ==, "checkpoint 'B' is missing");
    /* ... but the differential's is there */
    g_assert_true(plan(f, BACKUP_MODE_DIFFERENTIAL, NULL));
    g_ptr_array_add(f->verdict.chain, &f->bitmaps[1]);

    /* QEMU was killed: the chain up to B cannot be trusted */
    f->verdict.untrusted = 2;
    g_assert_false(plan(f, BACKUP_MODE_AUTO, NULL));
    g_assert_true(
        g_str_has_prefix(f->plan.why, "checkpoint 'B' cannot be trusted"));
    f->verdict.untrusted = 0;

    /* resized since */
    f->disk.size = 128 * MIB;
    g_assert_false(plan(f, BACKUP_MODE_AUTO, NULL));
    g_assert_cmpstr(f->plan.why, ==, "resized since backup 'B'");
    f->disk.size = 64 * MIB;

    /* a newer backup whose disk got no checkpoint */
    g_ptr_array_add(f->backups,
                    cp_manifest("C", 3, "B", "incremental", 64 * MIB, false));
    g_assert_false(plan(f, BACKUP_MODE_AUTO, NULL));
    g_assert_cmpstr(f->plan.why, ==, "backup 'C' has no checkpoint");

    /* no backup at all */
    g_ptr_array_set_size(f->backups, 0);
    g_assert_false(plan(f, BACKUP_MODE_AUTO, NULL));
    g_assert_cmpstr(f->plan.why, ==, "no earlier backup of this disk");
}

/* A disk that cannot hold checkpoints is full whatever the mode, and
 * that is no fallback (it would block every incremental of the VM). */
static void test_plan_no_bitmaps(PlanFixture *f, gconstpointer unused)
{
    (void)unused;
    f->disk.no_bitmaps = "raw";
    g_assert_true(plan(f, BACKUP_MODE_INCREMENTAL, NULL));
    g_assert_cmpint(f->plan.mode, ==, BACKUP_MODE_FULL);
    g_assert_false(f->plan.fallback);
    g_assert_cmpstr(f->plan.why, ==, "no checkpoints on this disk (raw)");
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/backup/retention/chain", test_retention_chain);
    g_test_add_func("/backup/retention/shared-full",
                    test_retention_shared_full);
    g_test_add("/backup/journal/roll-forward", Fixture, NULL, fixture_setup,
               test_roll_forward, fixture_teardown);
    g_test_add("/backup/journal/refused", Fixture, NULL, fixture_setup,
               test_journal_refused, fixture_teardown);
    g_test_add("/backup/plan/chain", PlanFixture, NULL, plan_setup,
               test_plan_chain, plan_teardown);
    g_test_add("/backup/plan/fallbacks", PlanFixture, NULL, plan_setup,
               test_plan_fallbacks, plan_teardown);
    g_test_add("/backup/plan/no-bitmaps", PlanFixture, NULL, plan_setup,
               test_plan_no_bitmaps, plan_teardown);
    return g_test_run();
}
