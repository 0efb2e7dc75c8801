/*
 * Encryption at rest: the repository's key fingerprint (REPO/key.json)
 * and the key file it is checked against. The key itself stays in its
 * file; QEMU reads it from there.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define KEY_JSON       "key.json"
#define KEY_MAX        4096
#define SALT_BYTES     16
#define KDF_NAME       "pbkdf2-hmac-sha256"
#define KDF_ITERATIONS 100000
#define KDF_MIN_ROUNDS 10000
#define KDF_MAX_ROUNDS 10000000
#define DIGEST_BYTES   32

void repo_pbkdf2_sha256(const guint8 *pass, gsize pass_len, const guint8 *salt,
                        gsize salt_len, guint iterations, guint8 out[32])
{
    /* one block: 32 bytes are SHA-256's own length */
    static const guint8 block_one[4] = { 0, 0, 0, 1 };
    g_autoptr(GHmac) keyed = g_hmac_new(G_CHECKSUM_SHA256, pass, pass_len);
    guint8 u[DIGEST_BYTES];
    gsize len = sizeof(u);
    GHmac *h = g_hmac_copy(keyed);

    g_hmac_update(h, salt, salt_len);
    g_hmac_update(h, block_one, sizeof(block_one));
    g_hmac_get_digest(h, u, &len);
    g_hmac_unref(h);
    memcpy(out, u, DIGEST_BYTES);
    for (guint i = 1; i < iterations; i++) {
        h = g_hmac_copy(keyed);
        g_hmac_update(h, u, sizeof(u));
        len = sizeof(u);
        g_hmac_get_digest(h, u, &len);
        g_hmac_unref(h);
        for (guint j = 0; j < DIGEST_BYTES; j++) {
            out[j] ^= u[j];
        }
    }
}

bool repo_encrypted(const Repo *r)
{
    g_autofree char *path = g_build_filename(r->root, KEY_JSON, NULL);
    struct stat st;

    return lstat(path, &st) == 0;
}

const char *repo_key_file(const Repo *r)
{
    return r->key_file;
}

G_GNUC_PRINTF(2, 3)
static bool key_error(GError **error, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_propagate_error(error,
                      g_error_new_valist(REPO_ERROR, REPO_ERROR_KEY, fmt, ap));
    va_end(ap);
    return false;
}

/* The passphrase in PATH (*LEN bytes), checked as QEMU will take it. */
static guint8 *read_key(const char *path, gsize *len, GError **error)
{
    g_autofree guint8 *buf = NULL;
    struct stat st;
    ssize_t n;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);

    if (fd < 0) {
        key_error(error, "cannot read the key file '%s': %s", path,
                  g_strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        key_error(error, "the key file '%s' is not a regular file", path);
        return NULL;
    }
    if (st.st_mode & 077) {
        close(fd);
        key_error(error,
                  "the key file '%s' is open to others (mode %03o): make it "
                  "owner-only (chmod 600)",
                  path, st.st_mode & 0777);
        return NULL;
    }
    buf = g_malloc(KEY_MAX + 1);
    n = read(fd, buf, KEY_MAX + 1);
    close(fd);
    if (n <= 0 || n > KEY_MAX || !g_utf8_validate((const char *)buf, n, NULL) ||
        memchr(buf, 0, n)) {
        key_error(error,
                  "the key file '%s' must hold a passphrase of 1 to %d bytes "
                  "of UTF-8 text (e.g. head -c 32 /dev/urandom | base64 -w0)",
                  path, KEY_MAX);
        return NULL;
    }
    *len = n;
    return g_steal_pointer(&buf);
}

/* HEX (2 * N lowercase digits) into OUT, or false. */
static bool unhex(const char *text, guint8 *out, gsize n)
{
    if (strlen(text) != 2 * n || strspn(text, "0123456789abcdef") != 2 * n) {
        return false;
    }
    for (gsize i = 0; i < n; i++) {
        out[i] = (guint8)(g_ascii_xdigit_value(text[2 * i]) << 4 |
                          g_ascii_xdigit_value(text[2 * i + 1]));
    }
    return true;
}

/* The fingerprint record in PATH: salt, rounds and digest. */
static bool load_fingerprint(const char *path, guint8 salt[SALT_BYTES],
                             guint64 *rounds, guint8 digest[DIGEST_BYTES],
                             GError **error)
{
    size_t len;
    g_autofree char *text = repo_read_text(path, &len, error);
    json_object *o = text ? jparse_object(text, len, path, error) : NULL;
    const char *enc, *kdf, *s, *d;
    bool ok;

    ok = o && jget_string(o, "encryption", false, path, &enc, error) &&
         jget_string(o, "kdf", false, path, &kdf, error) &&
         jget_uint(o, "iterations", path, rounds, error) &&
         jget_string(o, "salt", false, path, &s, error) &&
         jget_string(o, "fingerprint", false, path, &d, error);
    if (ok &&
        (strcmp(enc, "luks") != 0 || strcmp(kdf, KDF_NAME) != 0 ||
         *rounds < KDF_MIN_ROUNDS || *rounds > KDF_MAX_ROUNDS ||
         !unhex(s, salt, SALT_BYTES) || !unhex(d, digest, DIGEST_BYTES))) {
        ok = repo_corrupt(error, "%s: not a key fingerprint qbk made", path);
    }
    json_object_put(o);
    return ok;
}

static bool save_fingerprint(const char *path, const guint8 *key, gsize len,
                             GError **error)
{
    guint8 salt[SALT_BYTES], digest[DIGEST_BYTES];
    g_autofree char *salt_hex = NULL;
    g_autofree char *digest_hex = NULL;
    json_object *o = json_object_new_object();
    bool ok;

    if (getrandom(salt, SALT_BYTES, 0) != SALT_BYTES) {
        json_object_put(o);
        g_set_error(error, REPO_ERROR, REPO_ERROR_IO,
                    "no random bytes for the key's salt: %s",
                    g_strerror(errno));
        return false;
    }
    repo_pbkdf2_sha256(key, len, salt, SALT_BYTES, KDF_ITERATIONS, digest);
    salt_hex = util_hex(salt, SALT_BYTES);
    digest_hex = util_hex(digest, DIGEST_BYTES);
    json_object_object_add(o, "encryption", json_object_new_string("luks"));
    json_object_object_add(o, "kdf", json_object_new_string(KDF_NAME));
    json_object_object_add(o, "iterations",
                           json_object_new_int64(KDF_ITERATIONS));
    json_object_object_add(o, "salt", json_object_new_string(salt_hex));
    json_object_object_add(o, "fingerprint",
                           json_object_new_string(digest_hex));
    ok = repo_write_json(path, o, error);
    json_object_put(o);
    return ok;
}

bool repo_key_check(Repo *r, const char *key_file, bool adopt, GError **error)
{
    g_autofree char *path = g_build_filename(r->root, KEY_JSON, NULL);
    g_autofree guint8 *key = NULL;
    guint8 salt[SALT_BYTES], want[DIGEST_BYTES], got[DIGEST_BYTES];
    guint64 rounds;
    guint8 diff = 0;
    gsize len;

    key = read_key(key_file, &len, error);
    if (!key) {
        return false;
    }
    if (!repo_encrypted(r)) {
        if (!adopt) {
            return key_error(error,
                             "repository '%s' is not encrypted: its backups "
                             "were made without a key",
                             r->root);
        }
        if (!save_fingerprint(path, key, len, error)) {
            return false;
        }
    } else {
        if (!load_fingerprint(path, salt, &rounds, want, error)) {
            return false;
        }
        repo_pbkdf2_sha256(key, len, salt, SALT_BYTES, (guint)rounds, got);
        for (guint i = 0; i < DIGEST_BYTES; i++) {
            diff |= want[i] ^ got[i];
        }
        if (diff) {
            return key_error(error,
                             "the key in '%s' is not the key of repository "
                             "'%s'",
                             key_file, r->root);
        }
    }
    g_free(r->key_file);
    r->key_file = g_canonicalize_filename(key_file, NULL);
    return true;
}
