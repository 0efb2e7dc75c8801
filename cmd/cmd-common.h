/*
 * What every qbk command shares: exit codes, the one-line error format,
 * opening a VM (or its images) and printing sizes and JSON.
 */
#ifndef QBK_CMD_COMMON_H
#define QBK_CMD_COMMON_H

#include <stdbool.h>

#include "qmp.h"

/* Exit codes, documented in every --help and in README.md. */
enum {
    QBK_EXIT_OK = 0,
    QBK_EXIT_FAILURE = 1,     /* the operation failed; nothing changed */
    QBK_EXIT_USAGE = 2,       /* bad option, name, disk or checkpoint */
    QBK_EXIT_FULL_NEEDED = 3, /* checkpoint chain broken: full backup needed */
};

#define QBK_EXIT_CODES_HELP                                                    \
    "Exit status:\n"                                                           \
    "  0  success\n"                                                           \
    "  1  failure (QEMU unreachable or refused, I/O error); nothing changed\n" \
    "  2  usage error: bad option, unknown disk or checkpoint, bad name\n"     \
    "  3  checkpoint chain broken or missing: the next backup must be full\n"

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

/* "1.5 MiB" */
char *cmd_format_bytes(guint64 bytes);

/* Print OBJ as pretty JSON on stdout, then put it. */
void cmd_print_json(json_object *obj);

/* The exit status for a failure of lib/backup: 3 when a full backup is
 * needed, 2 for an unknown backup, disk or chain link, else 1. */
int cmd_backup_exit_code(const GError *error);

/* Make *PATH (a g_free-able string, may be NULL) absolute: qemu-img and
 * qemu-nbd resolve names elsewhere than our working directory. */
void cmd_make_absolute(char **path);

#endif /* QBK_CMD_COMMON_H */
