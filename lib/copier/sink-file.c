/*
 * A local raw file as the copier's target (a Sink), written with libaio:
 * one iocb per write with io_set_eventfd, and the eventfd polled on the
 * copier's GMainContext; completions are drained with a zero timeout.
 * The file is made sparse at the disk's size, so what is not written reads
 * as zeros. A short write is an error; -EAGAIN from io_submit keeps the
 * write queued for the next wake-up.
 *
 * Two ways to the device (CopierWriteMode):
 * - cached: io_submit copies the data into the page cache (for a buffered
 *   file it completes at once), and each completed write's writeback is
 *   started right away (sync_file_range WRITE), so the device is never
 *   idle waiting for the kernel's flusher and the final fdatasync finds
 *   little to do. Once more than COPIER_WRITE_BEHIND bytes are behind, the
 *   oldest writes are waited for and their pages dropped (fadvise
 *   DONTNEED): the backup does not push the guests' data out of the cache.
 * - direct: O_DIRECT (the page cache where the file system refuses it,
 *   e.g. tmpfs); lengths padded to whole sectors.
 */
#define _GNU_SOURCE /* O_DIRECT, fallocate */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <libaio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "internal.h"

#define DIRECT_ALIGN 4096

typedef struct {
    struct iocb iocb; /* first: the event's obj points here */
    SinkDone done;
    void *opaque;
    size_t len;
    guint64 offset;
} FileWrite;

typedef struct {
    guint64 offset, len;
} Behind;

typedef struct {
    Sink base;
    int fd;
    int efd; /* eventfd signalled on each completion */
    io_context_t aio;
    guint64 size;  /* of the disk: the file is cut to it at the end */
    bool direct;   /* O_DIRECT: lengths padded to DIRECT_ALIGN */
    bool cached;   /* writeback started per write, pages dropped behind */
    GQueue behind; /* cached: Behind*, oldest first */
    guint64 behind_bytes;
    int writeback_error; /* cached: the first error writeback reported */
    GQueue pending;      /* FileWrite* not yet accepted by io_submit */
    guint in_flight;
    GSource *source;
    GSourceFunc callback; /* the copier's pump, after each wake-up */
    gpointer data;
    char *path;
} FileSink;

static void submit_pending(FileSink *s)
{
    while (!g_queue_is_empty(&s->pending)) {
        FileWrite *w = g_queue_peek_head(&s->pending);
        struct iocb *iocbs[1] = { &w->iocb };
        int rc = io_submit(s->aio, 1, iocbs);

        if (rc == -EAGAIN) {
            return; /* the kernel is full: retry on the next completion */
        }
        g_queue_pop_head(&s->pending);
        if (rc != 1) {
            w->done(w->opaque, rc < 0 ? -rc : EIO);
            g_free(w);
            continue;
        }
        s->in_flight++;
    }
}

/* Cached: start the writeback of a completed write; past the limit, wait
 * for the oldest and drop their pages. */
static void write_behind(FileSink *s, guint64 offset, guint64 len)
{
    Behind *b = g_new(Behind, 1);

    if (sync_file_range(s->fd, offset, len, SYNC_FILE_RANGE_WRITE) < 0 &&
        !s->writeback_error) {
        s->writeback_error = errno;
    }
    *b = (Behind){ offset, len };
    g_queue_push_tail(&s->behind, b);
    s->behind_bytes += len;
    while (s->behind_bytes > COPIER_WRITE_BEHIND) {
        b = g_queue_pop_head(&s->behind);
        if (sync_file_range(s->fd, b->offset, b->len,
                            SYNC_FILE_RANGE_WAIT_BEFORE |
                                SYNC_FILE_RANGE_WRITE |
                                SYNC_FILE_RANGE_WAIT_AFTER) < 0 &&
            !s->writeback_error) {
            s->writeback_error = errno;
        }
        posix_fadvise(s->fd, b->offset, b->len, POSIX_FADV_DONTNEED);
        s->behind_bytes -= b->len;
        g_free(b);
    }
}

static gboolean on_eventfd(gint fd, GIOCondition cond, gpointer data)
{
    FileSink *s = data;
    struct io_event events[64];
    struct timespec zero = { 0, 0 };
    uint64_t count;
    int n;

    if (read(s->efd, &count, sizeof(count)) < 0 && errno != EAGAIN) {
        return G_SOURCE_CONTINUE;
    }
    while ((n = io_getevents(s->aio, 0, G_N_ELEMENTS(events), events, &zero)) >
           0) {
        for (int i = 0; i < n; i++) {
            FileWrite *w = (FileWrite *)events[i].obj;
            long res = (long)events[i].res;
            int err = res < 0 ? (int)-res : (size_t)res != w->len ? EIO : 0;

            s->in_flight--;
            if (!err && s->cached) {
                write_behind(s, w->offset, w->len);
            }
            w->done(w->opaque, err);
            g_free(w);
        }
    }
    submit_pending(s);
    return s->callback(s->data);
}

static const SinkOps file_ops;

static void file_sink_free(Sink *sink);

Sink *sink_file_new(const char *path, guint64 size, guint max_requests,
                    CopierWriteMode mode, GMainContext *ctx,
                    GSourceFunc callback, gpointer data, GError **error)
{
    FileSink *s = g_new0(FileSink, 1);
    /* a backup file: owner-only, and never written through a link */
    int flags = O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC;
    int rc;

    s->base.ops = &file_ops;
    s->fd = s->efd = -1;
    s->size = size;
    s->path = g_strdup(path);
    g_queue_init(&s->pending);
    g_queue_init(&s->behind);
    if (mode == COPIER_WRITE_DIRECT) {
        s->fd = open(path, flags | O_DIRECT, 0600);
        s->direct = s->fd >= 0;
    }
    if (!s->direct && (mode == COPIER_WRITE_CACHED || errno == EINVAL)) {
        /* cached, or no O_DIRECT here (tmpfs) */
        s->fd = open(path, flags, 0600);
        s->cached = mode == COPIER_WRITE_CACHED;
    }
    if (s->fd < 0 || ftruncate(s->fd, size) < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE,
                    "cannot create '%s': %s", path, g_strerror(errno));
        file_sink_free(&s->base);
        return NULL;
    }
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    rc = io_setup(max_requests, &s->aio);
    if (s->efd < 0 || rc < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE,
                    "cannot set up Linux AIO: %s",
                    g_strerror(rc < 0 ? -rc : errno));
        file_sink_free(&s->base);
        return NULL;
    }
    s->callback = callback;
    s->data = data;
    s->source = g_unix_fd_source_new(s->efd, G_IO_IN);
    g_source_set_callback(s->source, G_SOURCE_FUNC(on_eventfd), s, NULL);
    g_source_set_can_recurse(s->source, TRUE); /* see nbd-source.c */
    g_source_attach(s->source, ctx);
    return &s->base;
}

/* Make [OFFSET, OFFSET + LEN) read as zeros: a hole (synchronous). */
static bool file_sink_zero(FileSink *s, guint64 len, guint64 offset,
                           GError **error)
{
    if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                  len) < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE,
                    "cannot punch a hole in '%s': %s", s->path,
                    g_strerror(errno));
        return false;
    }
    return true;
}

static bool file_sink_write(Sink *sink, void *buf, guint64 len, guint64 offset,
                            bool zero, SinkDone done, void *opaque,
                            GError **error)
{
    FileSink *s = (FileSink *)sink;
    FileWrite *w;
    size_t io_len = len;

    if (zero) {
        if (!file_sink_zero(s, len, offset, error)) {
            return false;
        }
        done(opaque, 0);
        return true;
    }
    w = g_new0(FileWrite, 1);
    /* O_DIRECT wants whole sectors: the last write of an odd-sized disk is
     * padded (the buffer is big enough); the file is cut back at the end. */
    if (s->direct && io_len % DIRECT_ALIGN) {
        io_len += DIRECT_ALIGN - io_len % DIRECT_ALIGN;
    }
    w->done = done;
    w->opaque = opaque;
    w->len = io_len;
    w->offset = offset;
    io_prep_pwrite(&w->iocb, s->fd, buf, io_len, offset);
    io_set_eventfd(&w->iocb, s->efd);
    g_queue_push_tail(&s->pending, w);
    submit_pending(s);
    return true;
}

/* All writes done: cut the file to size and make it durable. */
static bool file_sink_flush(Sink *sink, SinkDone done, void *opaque,
                            GError **error)
{
    FileSink *s = (FileSink *)sink;
    int err;

    g_assert(s->in_flight == 0 && g_queue_is_empty(&s->pending));
    if (ftruncate(s->fd, s->size) < 0 || fdatasync(s->fd) < 0) {
        err = errno;
    } else {
        err = s->writeback_error; /* a write whose writeback failed */
    }
    if (err) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE,
                    "cannot complete '%s': %s", s->path, g_strerror(err));
        return false;
    }
    if (s->cached) {
        posix_fadvise(s->fd, 0, 0, POSIX_FADV_DONTNEED); /* all durable */
    }
    done(opaque, 0);
    return true;
}

static bool file_sink_dead(Sink *sink)
{
    return false;
}

static void file_sink_free(Sink *sink)
{
    FileSink *s = (FileSink *)sink;

    if (s->source) {
        g_source_destroy(s->source);
        g_source_unref(s->source);
    }
    if (s->in_flight) {
        /* Abandoned on failure: wait for the kernel to be done with the
         * buffers before the copier frees them. */
        struct io_event events[64];

        while (s->in_flight > 0) {
            int n = io_getevents(s->aio, 1, G_N_ELEMENTS(events), events, NULL);

            if (n <= 0) {
                break;
            }
            for (int i = 0; i < n; i++) {
                g_free(events[i].obj);
            }
            s->in_flight -= n;
        }
    }
    g_queue_clear_full(&s->pending, g_free);
    g_queue_clear_full(&s->behind, g_free);
    if (s->aio) {
        io_destroy(s->aio);
    }
    if (s->efd >= 0) {
        close(s->efd);
    }
    if (s->fd >= 0) {
        close(s->fd);
    }
    g_free(s->path);
    g_free(s);
}

static const SinkOps file_ops = {
    .write = file_sink_write,
    .flush = file_sink_flush,
    .dead = file_sink_dead,
    .free = file_sink_free,
};
