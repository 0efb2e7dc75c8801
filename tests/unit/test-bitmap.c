/*
 * lib/bitmap's pure logic: checkpoint names, chains across disks, and the
 * verdicts of the chain check, on disks described by hand. (What QEMU does
 * with the resulting transactions is tested in tests/qbk-checkpoint.bats.)
 */
#include <string.h>

#include "bitmap.h"

static void test_names(void)
{
    guint seq = 0;
    g_autofree char *name = NULL;
    bool partial = true;

    g_assert_true(bitmap_name_valid("mon", NULL));
    g_assert_true(bitmap_name_valid("2026-11-22T10.00_a+b", NULL));
    g_assert_false(bitmap_name_valid("", NULL));
    g_assert_false(bitmap_name_valid("-x", NULL));
    g_assert_false(bitmap_name_valid("a b", NULL));
    g_assert_false(bitmap_name_valid("a/b", NULL));
    g_assert_false(bitmap_name_valid("\xc3\xbc", NULL));
    g_assert_true(bitmap_name_valid(
        "1234567890123456789012345678901234567890123456789012345678901234",
        NULL));
    g_assert_false(bitmap_name_valid(
        "12345678901234567890123456789012345678901234567890123456789012345",
        NULL));

    g_assert_true(bitmap_parse_name("qbk-000042-mon", &seq, &name, &partial));
    g_assert_cmpuint(seq, ==, 42);
    g_assert_cmpstr(name, ==, "mon");
    g_assert_false(partial);
    g_assert_true(bitmap_parse_name("qbk-000043p-x-y", &seq, NULL, &partial));
    g_assert_cmpuint(seq, ==, 43);
    g_assert_true(partial);
    g_assert_false(bitmap_parse_name("qbk-since-mon", NULL, NULL, NULL));
    g_assert_false(bitmap_parse_name("qbk-00042-mon", NULL, NULL, NULL));
    g_assert_false(bitmap_parse_name("qbk-000042", NULL, NULL, NULL));
    g_assert_false(bitmap_parse_name("qbk-000042-", NULL, NULL, NULL));
    g_assert_false(bitmap_parse_name("vendor-000042-mon", NULL, NULL, NULL));
}

/* Flags per bitmap: r recording, i inconsistent, t transient. */
static void add_bitmap(QmpDisk *disk, const char *name, const char *flags)
{
    QmpBitmap *b = g_new0(QmpBitmap, 1);

    b->name = g_strdup(name);
    b->granularity = 65536;
    b->recording = strchr(flags, 'r') != NULL;
    b->inconsistent = strchr(flags, 'i') != NULL;
    b->persistent = strchr(flags, 't') == NULL;
    g_ptr_array_add(disk->bitmaps, b);
}

static void free_bitmap(gpointer p)
{
    QmpBitmap *b = p;

    g_free(b->name);
    g_free(b);
}

static QmpDisk *new_disk(const char *id)
{
    QmpDisk *disk = g_new0(QmpDisk, 1);

    disk->id = g_strdup(id);
    disk->node = g_strdup_printf("%s-fmt", id);
    disk->device = g_strdup("");
    disk->driver = g_strdup("qcow2");
    disk->bitmaps = g_ptr_array_new_with_free_func(free_bitmap);
    return disk;
}

static GPtrArray *new_disks(void)
{
    return g_ptr_array_new_with_free_func((GDestroyNotify)qmp_disk_free);
}

static guint count_kind(const BitmapCheck *check, BitmapIssueKind kind)
{
    guint n = 0;

    for (guint i = 0; i < check->issues->len; i++) {
        n += ((BitmapIssue *)check->issues->pdata[i])->kind == kind;
    }
    return n;
}

static void test_chain_order(void)
{
    g_autoptr(GPtrArray) disks = new_disks();
    g_autoptr(GPtrArray) cps = NULL;
    g_autoptr(GPtrArray) chain = NULL;
    QmpDisk *a = new_disk("a"), *b = new_disk("b");
    BitmapCheckpoint *cp;

    /* QEMU lists bitmaps in no useful order. */
    add_bitmap(a, "qbk-000010-ten", "r");
    add_bitmap(a, "vendor", "r");
    add_bitmap(a, "qbk-000002-two", "");
    add_bitmap(b, "qbk-000002-two", "");
    add_bitmap(b, "qbk-000010-ten", "r");
    g_ptr_array_add(disks, a);
    g_ptr_array_add(disks, b);

    cps = bitmap_list_checkpoints(disks);
    g_assert_cmpuint(cps->len, ==, 2);
    cp = cps->pdata[0];
    g_assert_cmpstr(cp->name, ==, "two");
    g_assert_cmpuint(cp->disks->len, ==, 2);
    g_assert_true(bitmap_find_checkpoint(cps, "ten") == cps->pdata[1]);
    g_assert_true(bitmap_find_checkpoint(cps, "qbk-000010-ten") ==
                  cps->pdata[1]);
    g_assert_null(bitmap_find_checkpoint(cps, "vendor"));

    chain = bitmap_disk_chain(a);
    g_assert_cmpuint(chain->len, ==, 2);
    g_assert_cmpstr(((QmpBitmap *)chain->pdata[0])->name, ==, "qbk-000002-two");
}

static void test_check_healthy(void)
{
    g_autoptr(GPtrArray) disks = new_disks();
    g_autoptr(BitmapCheck) check = NULL;
    QmpDisk *a = new_disk("a");

    add_bitmap(a, "qbk-000001-x", "");
    add_bitmap(a, "qbk-000002-y", "r");
    add_bitmap(a, "vendor", "r");
    a->nameless_bitmaps = 1;
    g_ptr_array_add(disks, a);
    check = bitmap_check(disks);
    g_assert_false(bitmap_check_has_errors(check));
    g_assert_cmpuint(count_kind(check, BITMAP_ISSUE_FOREIGN), ==, 1);
    g_assert_cmpuint(count_kind(check, BITMAP_ISSUE_NAMELESS), ==, 1);
    g_assert_cmpuint(bitmap_check_verdict(check, a)->untrusted, ==, 0);
}

static void test_check_inconsistent_middle(void)
{
    g_autoptr(GPtrArray) disks = new_disks();
    g_autoptr(BitmapCheck) check = NULL;
    QmpDisk *a = new_disk("a");

    /* Made after a crash: 3 is good, 1-2 are not. */
    add_bitmap(a, "qbk-000001-x", "i");
    add_bitmap(a, "qbk-000002-y", "i");
    add_bitmap(a, "qbk-000003-z", "r");
    g_ptr_array_add(disks, a);
    check = bitmap_check(disks);
    g_assert_true(bitmap_check_has_errors(check));
    g_assert_cmpuint(count_kind(check, BITMAP_ISSUE_INCONSISTENT), ==, 2);
    g_assert_cmpuint(bitmap_check_verdict(check, a)->untrusted, ==, 2);
    g_assert_cmpint(
        bitmap_verdict_find(bitmap_check_verdict(check, a), "qbk-000003-z"), ==,
        2);
    g_assert_cmpint(
        bitmap_verdict_find(bitmap_check_verdict(check, a), "qbk-000001-x"), ==,
        0);
    g_assert_cmpint(
        bitmap_verdict_find(bitmap_check_verdict(check, a), "vendor"), ==, -1);
    g_assert_cmpint(bitmap_verdict_find(NULL, "qbk-000001-x"), ==, -1);
}

static void test_check_missing_and_partial(void)
{
    g_autoptr(GPtrArray) disks = new_disks();
    g_autoptr(BitmapCheck) check = NULL;
    QmpDisk *a = new_disk("a"), *b = new_disk("b"), *c = new_disk("c");

    /* 2 was VM-wide and is gone from b; 3 was made on a only (partial). */
    add_bitmap(a, "qbk-000001-x", "");
    add_bitmap(a, "qbk-000002-y", "");
    add_bitmap(a, "qbk-000003p-z", "");
    add_bitmap(a, "qbk-000004-w", "r");
    add_bitmap(b, "qbk-000001-x", "");
    add_bitmap(b, "qbk-000004-w", "r");
    /* c was added to the VM after 2: its chain starts later, no gap. */
    add_bitmap(c, "qbk-000004-w", "r");
    g_ptr_array_add(disks, a);
    g_ptr_array_add(disks, b);
    g_ptr_array_add(disks, c);
    check = bitmap_check(disks);
    g_assert_cmpuint(count_kind(check, BITMAP_ISSUE_MISSING), ==, 1);
    g_assert_cmpuint(bitmap_check_verdict(check, a)->untrusted, ==, 0);
    g_assert_cmpuint(bitmap_check_verdict(check, b)->untrusted, ==, 1);
    g_assert_cmpuint(bitmap_check_verdict(check, c)->untrusted, ==, 0);
}

static void test_check_recording(void)
{
    g_autoptr(GPtrArray) disks = new_disks();
    g_autoptr(BitmapCheck) check = NULL;
    QmpDisk *a = new_disk("a"), *b = new_disk("b");
    const BitmapDiskVerdict *v;

    add_bitmap(a, "qbk-000001-x", "");
    add_bitmap(a, "qbk-000002-y", "");   /* newest stopped recording */
    add_bitmap(b, "qbk-000001-x", "rt"); /* stale and transient */
    add_bitmap(b, "qbk-000002-y", "r");
    g_ptr_array_add(disks, a);
    g_ptr_array_add(disks, b);
    check = bitmap_check(disks);
    g_assert_cmpuint(count_kind(check, BITMAP_ISSUE_NOT_RECORDING), ==, 1);
    g_assert_cmpuint(bitmap_check_verdict(check, a)->untrusted, ==, 2);
    v = bitmap_check_verdict(check, b);
    g_assert_cmpuint(v->untrusted, ==, 0);
    g_assert_cmpuint(v->disable->len, ==, 1);
    g_assert_cmpuint(count_kind(check, BITMAP_ISSUE_NOT_PERSISTENT), ==, 1);
    g_assert_cmpint(bitmap_issue_severity(BITMAP_ISSUE_STALE_RECORDING), ==,
                    BITMAP_SEVERITY_WARNING);
}

static void test_check_skips_unsupported(void)
{
    g_autoptr(GPtrArray) disks = new_disks();
    g_autoptr(BitmapCheck) check = NULL;
    QmpDisk *raw = new_disk("raw");

    raw->no_bitmaps = g_strdup("raw image");
    g_ptr_array_add(disks, raw);
    check = bitmap_check(disks);
    g_assert_cmpuint(check->verdicts->len, ==, 0);
    g_assert_null(bitmap_check_verdict(check, raw));
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/bitmap/names", test_names);
    g_test_add_func("/bitmap/chain-order", test_chain_order);
    g_test_add_func("/bitmap/check-healthy", test_check_healthy);
    g_test_add_func("/bitmap/check-inconsistent-middle",
                    test_check_inconsistent_middle);
    g_test_add_func("/bitmap/check-missing-and-partial",
                    test_check_missing_and_partial);
    g_test_add_func("/bitmap/check-recording", test_check_recording);
    g_test_add_func("/bitmap/check-skips-unsupported",
                    test_check_skips_unsupported);
    return g_test_run();
}
