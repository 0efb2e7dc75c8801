/*
 * Private to lib/copier.
 */
#ifndef QBK_COPIER_INTERNAL_H
#define QBK_COPIER_INTERNAL_H

#include <glib-unix.h>
#include <libnbd.h>

#include "copier.h"

/* ---- planning (plan.c): block status -> chunks ---- */

/* What a region of the source needs. */
typedef enum {
    REGION_SKIP, /* not dirty: the target (or its backing) already has it */
    REGION_ZERO, /* dirty and reads as zeros */
    REGION_DATA, /* dirty and holds data */
} RegionKind;

/* A run of one kind, as block status described it. */
typedef struct {
    guint64 offset;
    guint64 length;
    RegionKind kind;
} Region;

/* A unit of work: [offset, offset + length), block aligned except at the
 * disk's end. */
typedef struct {
    guint64 offset;
    guint64 length;
    bool zero; /* write zeros (or skip on a zeroed target) instead of data */
} Chunk;

/*
 * NBD extent arrays (length, flags pairs) of one block-status window that
 * starts at START, turned into regions of [START, *END). ALLOC: from
 * "base:allocation"; DIRTY: from the bitmap context, or NULL (all dirty).
 * *END is where both contexts have answered, block aligned unless it is the
 * disk's end SIZE; at least one block is always covered.
 */
GArray *plan_regions(guint64 start, guint64 size, const uint32_t *alloc,
                     size_t n_alloc, const uint32_t *dirty, size_t n_dirty,
                     guint64 *end);

/*
 * Cut REGIONS into chunks of at most CHUNK_SIZE bytes, appended to CHUNKS.
 * Data is widened to whole blocks; zeros are narrowed to whole blocks and
 * their partial edge blocks become data, so no dirty byte is skipped and no
 * data block is ever zeroed. Returns the bytes skipped.
 */
guint64 plan_chunks(GArray *regions, guint64 size, guint64 chunk_size,
                    GQueue *chunks);

/* ---- the work queue (queue.c) ---- */

/*
 * What is left to copy, taken chunk by chunk: hot ranges first (higher
 * level, then newer bump, then lower offset), then the rest in offset
 * order. Memory follows the number of ranges, not the disk's size.
 */
typedef struct ChunkQueue ChunkQueue;

ChunkQueue *chunk_queue_new(guint64 chunk_size);
void chunk_queue_free(ChunkQueue *q);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ChunkQueue, chunk_queue_free)

/* Add [OFFSET, OFFSET + LENGTH), block aligned, after everything pushed
 * so far (a part that overlaps what was pushed is dropped). */
void chunk_queue_push(ChunkQueue *q, guint64 offset, guint64 length, bool zero);

/* Take the next chunk (at most the chunk size; zeros up to 64 times that).
 * Returns false when the queue is empty. */
bool chunk_queue_pop(ChunkQueue *q, Chunk *out);

/*
 * Make what is still queued in [OFFSET, OFFSET + LENGTH) (widened to whole
 * blocks) hot at LEVEL (> 0), newer than every earlier bump; parts already
 * at LEVEL or hotter keep their place. Returns the bytes that got hotter.
 */
guint64 chunk_queue_bump(ChunkQueue *q, guint64 offset, guint64 length,
                         guint level);

/*
 * Guest-write notices: apply one answer of the notice map, N uint32s of
 * (length, flags) pairs from POS (DEPTH: "qemu:allocation-depth", where 1
 * means written; else "base:allocation", where allocated means written).
 * What the guest wrote goes to level 2, RADIUS bytes around it to level 1.
 * FN (may be NULL) hears of each written extent that made something
 * hotter. Returns where the answer ended.
 */
typedef void (*NoticeFn)(guint64 offset, guint64 length, guint64 bumped,
                         void *opaque);
guint64 notice_apply(ChunkQueue *q, guint64 pos, guint64 size,
                     const uint32_t *entries, size_t n, bool depth,
                     guint64 radius, NoticeFn fn, void *opaque);

guint64 chunk_queue_bytes(const ChunkQueue *q);
bool chunk_queue_is_empty(const ChunkQueue *q);
guint chunk_queue_entries(const ChunkQueue *q); /* ranges held */

/* ---- a libnbd handle on a GMainContext (nbd-source.c) ---- */

/*
 * Connect to ENDPOINT, asking for META_CONTEXTS (NULL-terminated, may be
 * NULL), and attach a source to CTX that runs libnbd's state machine and
 * then calls CALLBACK(DATA). Returns the handle; the source is in *SOURCE.
 */
struct nbd_handle *nbd_source_connect(const CopierEndpoint *endpoint,
                                      const char *const *meta_contexts,
                                      GMainContext *ctx, GSourceFunc callback,
                                      gpointer data, GSource **source,
                                      GError **error);

/* ---- a local raw file as the target (aio-file-sink.c) ---- */

typedef struct FileSink FileSink;
typedef void (*FileSinkDone)(void *opaque, int err);

/*
 * Create PATH as a sparse raw file of SIZE bytes, written through Linux AIO
 * whose completions wake CTX and then run CALLBACK(DATA).
 */
FileSink *file_sink_open(const char *path, guint64 size, guint max_requests,
                         GMainContext *ctx, GSourceFunc callback, gpointer data,
                         GError **error);

/* Write LEN bytes of BUF (page aligned) at OFFSET; DONE(OPAQUE, errno or 0)
 * runs from the loop when it completed. */
void file_sink_write(FileSink *s, void *buf, size_t len, guint64 offset,
                     FileSinkDone done, void *opaque);

/* Make [OFFSET, OFFSET + LEN) read as zeros (synchronous). */
bool file_sink_zero(FileSink *s, guint64 len, guint64 offset, GError **error);

/* All writes done: cut the file to size and make it durable. */
bool file_sink_finish(FileSink *s, GError **error);
void file_sink_free(FileSink *s);

#endif /* QBK_COPIER_INTERNAL_H */
