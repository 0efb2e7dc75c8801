/*
 * What every qbk command shares: exit codes, the one-line error format,
 * opening a VM (or its images) and printing sizes and JSON.
 */
#ifndef QBK_CMD_COMMON_H
#define QBK_CMD_COMMON_H

#include <stdbool.h>

#include "copier.h"
#include "qmp.h"
#include "repo.h"

/* The longest --timeout, seconds. */
#define CMD_MAX_TIMEOUT_S 86400

/* Exit codes, documented in every --help and in README.md. */
enum {
    QBK_EXIT_OK = 0,
    QBK_EXIT_FAILURE = 1,     /* the operation failed; nothing changed */
    QBK_EXIT_USAGE = 2,       /* bad option, name, disk or checkpoint */
    QBK_EXIT_FULL_NEEDED = 3, /* checkpoint chain broken: full backup needed */
    QBK_EXIT_LEFTOVER = 4,    /* check: a killed backup left state in the VM */
};

#define QBK_EXIT_CODES_HELP                                                    \
    "Exit status:\n"                                                           \
    "  0  success\n"                                                           \
    "  1  failure (QEMU unreachable or refused, I/O error); nothing changed\n" \
    "  2  usage error: bad option, unknown disk or checkpoint, bad name\n"     \
    "  3  checkpoint chain broken or missing: the next backup must be full\n"  \
    "  4  check: a killed backup left state in the VM (check --repair)\n"

/* Options that several commands share, added by CmdSpec.common. */
typedef enum {
    CMD_OPT_QMP = 1 << 0,   /* --qmp SOCKET and --timeout SECONDS */
    CMD_OPT_QUIET = 1 << 1, /* --quiet: nothing on stderr but errors */
    /* the copier's --requests, --connections, --chunk-size, --sequential,
     * --rate-limit, --stall-timeout and --write-mode */
    CMD_OPT_COPIER = 1 << 2,
    CMD_OPT_TLS = 1 << 3, /* --tls-creds DIR (also with CMD_OPT_QMP) */
    CMD_OPT_KEY = 1 << 4, /* --key-file FILE: an encrypted repository's */
} CmdOptions;

/* What a command is, for its --help and its prologue. */
typedef struct {
    const char *name;        /* "qbk-pull" */
    const char *parameters;  /* after the name in --help's first line */
    const char *summary;     /* what it does (may be NULL) */
    const char *description; /* examples; the exit codes are added */
    GOptionEntry *entries;   /* its options; --version is added */
    CmdOptions common;       /* shared options to add */
} CmdSpec;

/* The shared options as given (cmd_parse checks their bounds). */
typedef struct {
    char *qmp;       /* --qmp, else $QBK_QMP, else NULL */
    bool qmp_env;    /* it came from $QBK_QMP */
    char *tls_creds; /* --tls-creds, else $QBK_TLS_CREDS, else NULL */
    int timeout_s;   /* --timeout: 1 to CMD_MAX_TIMEOUT_S */
    gboolean quiet;
    CopierOptions copier; /* the defaults with the options given */
    gboolean sequential;  /* --sequential (copier.requests is 1) */
    bool requests_given;  /* --requests or --sequential: no default to pick */
    char *key_file;       /* --key-file, else $QBK_KEY_FILE, else NULL */
    bool key_env;         /* it came from $QBK_KEY_FILE */
} CmdCommon;

extern CmdCommon cmd_common;

/*
 * Every command's prologue: the program's name, the options of SPEC parsed
 * out of ARGC/ARGV (with the shared ones SPEC asks for, into cmd_common,
 * bounds checked), --help and --version. Returns -1 for the command to go
 * on, or the status to exit with (after a usage error or --version).
 */
int cmd_parse(const CmdSpec *spec, int *argc, char ***argv);

/* Print "PROG: MESSAGE" on stderr (one line). */
G_GNUC_PRINTF(1, 2) void cmd_error(const char *fmt, ...);

/* Print "PROG: MESSAGE" on stderr unless --quiet. */
G_GNUC_PRINTF(1, 2) void cmd_info(const char *fmt, ...);

void cmd_set_quiet(bool quiet);

/*
 * A VM to work on: connected over QMP, or a private qemu-storage-daemon
 * holding IMAGES when the VM is not running.
 */
typedef struct {
    QmpClient *qmp;
    GPtrArray *disks; /* QmpDisk*, owned */
    bool offline;     /* IMAGES through qemu-storage-daemon */
    char **image_ids; /* offline: the images as given */
    char **nodes;     /* offline: their node names */
} CmdVm;

/* Connect to QEMU's monitor at ADDRESS (with --tls-creds for "tls:"). */
QmpClient *cmd_qmp_connect(const char *address, int timeout_ms, GError **error);

/* Open the VM at QMP_ADDRESS, or IMAGES offline (exactly one is set). */
CmdVm *cmd_vm_open(const char *qmp_address, char **images, int timeout_ms,
                   GError **error);

/* Re-read the disks (after a change). */
bool cmd_vm_refresh(CmdVm *vm, GError **error);

/*
 * Close; offline, stop the daemon and report whether it wrote the images
 * back cleanly.
 */
bool cmd_vm_close(CmdVm *vm, GError **error);
void cmd_vm_free(CmdVm *vm);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CmdVm, cmd_vm_free)

/*
 * The disks named in NAMES (NULL: every disk that can hold checkpoints).
 * Borrowed from VM. Unknown names fail.
 */
GPtrArray *cmd_vm_select_disks(CmdVm *vm, char **names, GError **error);

/*
 * The repository's key, before anything is read or written: --key-file
 * checked against REPO's fingerprint (a repository without a key takes it
 * if ADOPT), or none given for a repository that has none ($QBK_KEY_FILE
 * is not used there). REPO_ERROR_KEY (exit 2) otherwise.
 */
bool cmd_repo_key(Repo *repo, bool adopt, GError **error);

/* ---- options: every bound checked before anything is touched ---- */

/* Print "PROG: MESSAGE (see --help)" and return QBK_EXIT_USAGE. */
int cmd_usage(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* Whether option NAME's VALUE lies in [MIN, MAX] (G_OPTION_ERROR). */
bool cmd_check_range(const char *name, gint64 value, gint64 min, gint64 max,
                     GError **error);

/* Whether option NAME's VALUE is a finite number in [MIN, MAX]. */
bool cmd_check_number(const char *name, double value, double min, double max,
                      GError **error);

/* Parse a size such as "4096", "50M", "2GiB" (K, M, G, T: powers of 1024)
 * into *OUT: no sign, no overflow, at least 1. */
bool cmd_parse_size(const char *name, const char *text, guint64 *out,
                    GError **error);

/* Whether option NAME gives a path (not empty). */
bool cmd_check_path(const char *name, const char *path, GError **error);

/* "1.5 MiB" */
char *cmd_format_bytes(guint64 bytes);

/* Print OBJ as pretty JSON on stdout, then put it. */
void cmd_print_json(json_object *obj);

/*
 * The end of a command that gives one result per disk. With no result,
 * NONE is the error and the status QBK_EXIT_USAGE; else with JSON (--json)
 * RESULTS are printed as {"results": [...]} and EXTRA's members (EXTRA may
 * be NULL), and the status is RC. Takes RESULTS and EXTRA.
 */
int cmd_finish_results(json_object *results, json_object *extra, bool json,
                       const char *none, int rc);

/* The exit status for a failure of lib/backup or lib/repo: 3 when a full
 * backup is needed, 2 for an unknown backup, disk or chain link or a bad
 * name or option, else 1. */
int cmd_backup_exit_code(const GError *error);

/* What a user can do about ERROR, as " (...)" to append, or "". */
const char *cmd_hint(const GError *error);

/* Make *PATH (a g_free-able string, may be NULL) absolute: qemu-img and
 * qemu-nbd resolve names elsewhere than our working directory. */
void cmd_make_absolute(char **path);

#endif /* QBK_CMD_COMMON_H */
