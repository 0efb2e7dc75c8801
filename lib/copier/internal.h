/*
 * Private to lib/copier.
 */
#ifndef QBK_COPIER_INTERNAL_H
#define QBK_COPIER_INTERNAL_H

#include <glib-unix.h>
#include <libnbd.h>

#include "copier.h"

/* Zeros move no data: they go in pieces of up to this (one NBD
 * write-zeroes, one hole punched), so a sparse disk's holes cost a request
 * per GiB, not per chunk. */
#define COPIER_ZERO_CHUNK_MAX (G_GUINT64_CONSTANT(1) << 30)

/* ---- planning (plan.c): block status -> chunks ---- */

/* Block status questions in flight at once (select.c): a sparse 8 TiB
 * disk is 2048 of them, and one at a time each waited a round trip. */
#define SELECT_ASKS 4

/* Which question about a window is out (select.c). */
typedef enum {
    ASK_BOTH,  /* allocation and the selection's map, in one question */
    ASK_DIRTY, /* the selection's map alone (on the map connection) */
    ASK_ALLOC, /* allocation, only where the map said dirty */
    ASK_CHAIN, /* the chain's allocation depth, where allocation said hole */
} AskStep;

/* One window's block status questions and their answers (select.c). */
typedef struct {
    Copier *copier;
    guint64 pos, len;  /* the window */
    guint64 alloc_pos; /* where ALLOC and DEPTH begin: POS, or the first
                        * dirty block of the window */
    GArray *alloc;     /* uint32 (length, flags) pairs: base:allocation */
    GArray *dirty;     /* ... the selection's context, from POS */
    GArray *depth;     /* ... the chain's allocation depth, or NULL */
    AskStep step;      /* the question out, or last answered */
    bool done;         /* its completion arrived */
    int error;
    gint64 asked_us; /* stats */
} SelectAsk;

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
 * ALLOC's N (length, flags) pairs of "base:allocation" from START, with
 * every part that is a hole but not zero, and where DEPTH's ND pairs of
 * "qemu:allocation-depth" (also from START) say 0, made hole and zero.
 * Parts DEPTH does not reach keep their flags. Returns a new array of
 * uint32 pairs covering what ALLOC covered.
 */
GArray *plan_chain_zeros(const uint32_t *alloc, size_t n, const uint32_t *depth,
                         size_t nd);
bool is_unknown_hole(uint32_t flags); /* a hole, not said to be zero */

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
bool chunk_queue_next_is_hot(const ChunkQueue *q); /* a hot range is next */
guint chunk_queue_entries(const ChunkQueue *q);    /* ranges held */

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

/* Whether NBD (may be NULL) is dead or closed: its server went away. */
bool nbd_source_gone(struct nbd_handle *nbd);

/* Detach SOURCE (may be NULL) and close NBD (may be NULL). */
void nbd_source_close(struct nbd_handle *nbd, GSource *source);

/* ---- targets: where the data goes (sink-nbd.c, sink-file.c, sink-null.c)
 * ---- */

typedef struct Sink Sink;

/* A write or flush ended: ERR is 0 or an errno. Runs from the loop. */
typedef void (*SinkDone)(void *opaque, int err);

typedef struct {
    /* Write LEN bytes of BUF (page aligned, chunk-size long) at OFFSET, or
     * with ZERO make the range read as zeros (BUF unused). DONE(OPAQUE)
     * runs when it completed; false with ERROR if it could not start. */
    bool (*write)(Sink *s, void *buf, guint64 len, guint64 offset, bool zero,
                  SinkDone done, void *opaque, GError **error);
    /* Everything written: make it durable, then DONE(OPAQUE). */
    bool (*flush)(Sink *s, SinkDone done, void *opaque, GError **error);
    /* Whether it can no longer be written (its server went away). */
    bool (*dead)(Sink *s);
    /* Free it; writes in flight are abandoned, and their buffers are no
     * longer used once this returns. */
    void (*free)(Sink *s);
} SinkOps;

/* Each sink begins with this. */
struct Sink {
    const SinkOps *ops;
};

/* An NBD export of SIZE bytes, writable and able to write zeros. */
Sink *sink_nbd_new(const CopierEndpoint *endpoint, guint64 size,
                   GMainContext *ctx, GSourceFunc callback, gpointer data,
                   GError **error);

/* PATH made a sparse raw file of SIZE bytes, written (as MODE says)
 * through Linux AIO whose completions wake CTX and then run
 * CALLBACK(DATA). */
Sink *sink_file_new(const char *path, guint64 size, guint max_requests,
                    CopierWriteMode mode, GMainContext *ctx,
                    GSourceFunc callback, gpointer data, GError **error);

/* Nothing: the data is read (and hashed) only, to verify. */
Sink *sink_null_new(void);

static inline void sink_free(Sink *s)
{
    if (s) {
        s->ops->free(s);
    }
}

/* ---- the engine's state, shared by its files ---- */

typedef enum {
    REQ_IDLE,
    REQ_READING,
    REQ_READ_DONE,
    REQ_WRITING,
    REQ_WRITE_DONE,
} RequestState;

typedef struct Copier Copier;

typedef struct {
    Copier *copier;
    RequestState state;
    struct nbd_handle *reader; /* the source connection it reads from */
    Chunk chunk;               /* what this request works on */
    guint8 *buf;               /* from the budget while busy, or NULL */
    int error;                 /* errno from the last completion, 0 if none */
    gint64 read_start_us;
} Request;

struct CopierBudget {
    guint limit;        /* requests in flight at once, all copiers */
    guint active;       /* now */
    guint running;      /* copiers started and not done: they share LIMIT */
    guint64 chunk_size; /* of each buffer */
    GPtrArray *free;    /* idle buffers, page aligned */
    guint buffers;      /* allocated, at most LIMIT */
};

/* A buffer for one request, or NULL if the budget is spent. */
guint8 *budget_take(CopierBudget *b);
void budget_give(CopierBudget *b, guint8 *buf);

struct Copier {
    /* initialized once and never changed */
    CopierOptions opts;
    guint64 size;
    char *bitmap_context; /* the selection's map context, or NULL */
    GMainContext *ctx;
    CopierBudget *budget;     /* shared with the other copiers, or own */
    CopierBudget *own_budget; /* when none was given */
    struct nbd_handle *src;
    /* the selection's map alone (readers[1]), or NULL: asked on src with
     * allocation (select.c) */
    struct nbd_handle *map;
    Sink *sink;
    /* more connections to the source for reads; readers[0] is src */
    struct nbd_handle *readers[COPIER_MAX_CONNECTIONS];
    GSource *reader_sources[COPIER_MAX_CONNECTIONS];
    guint nreaders;
    GSource *src_source, *tick;
    guint8 zero_digest[COPIER_DIGEST_LEN];      /* of a whole zero block */
    guint8 zero_tail_digest[COPIER_DIGEST_LEN]; /* of the last one */
    CopierDone done;                            /* told when it ended */
    void *done_opaque;

    /* planning (select.c): block status runs ahead of the requests, a few
     * windows at once, planned in order */
    guint64 plan_pos;            /* planned up to here */
    guint64 ask_pos;             /* block status asked up to here */
    SelectAsk asks[SELECT_ASKS]; /* a ring: ask_head, then ask_count more */
    guint ask_head, ask_count;
    struct nbd_handle *chain; /* opts.chain's allocation depth */
    GSource *chain_source;
    ChunkQueue *queue; /* planned and not started */

    /* release (release.c) */
    GQueue releases; /* Chunk*: planned as not needed, to trim */
    guint releases_in_flight;
    guint64 rel_offset, rel_length; /* copied, being gathered into a trim */
    gint64 rel_since_us;

    /* guest-write notices (notices.c): sweeps of the notice export's map */
    struct nbd_handle *notice;
    GSource *notice_source;
    bool notice_depth;     /* the context is qemu:allocation-depth */
    bool notice_in_flight; /* a block status call is out */
    bool notice_done;      /* ... and its answer is in */
    int notice_error;
    guint64 notice_pos;     /* where the sweep goes on */
    gint64 next_sweep_us;   /* when the next sweep starts */
    GArray *notice_extents; /* uint32 pairs of the answer */

    /* pacing (pacing.c) */
    guint window;                       /* requests allowed in flight */
    guint64 paced_reads, paced_read_us; /* this period */
    gint64 pacing_since_us;
    double window_integral; /* window x seconds */
    guint64 all_reads, all_read_us;

    /* the requests */
    Request *reqs;
    guint nreqs;
    guint active; /* not IDLE */

    /* the end */
    bool started, ended;
    bool flushing, flushed;
    int flush_error;
    GError *error; /* first failure wins */

    /* accounting */
    CopierStats stats;
    guint64 read_started; /* bytes, for the rate limit */
    gint64 start_us, last_progress_us, last_activity_us;
};

/* Reports (report.c): the first failure wins; trace lines if asked. */
G_GNUC_PRINTF(3, 4)
void copier_fail(Copier *c, CopierErrorCode code, const char *fmt, ...);
G_GNUC_PRINTF(2, 3)
void copier_trace(Copier *c, const char *fmt, ...);

/* The engine's step (copier.c): a GSourceFunc for every wake-up. */
gboolean copier_pump(gpointer data);

/* What to copy (select.c): the map contexts to ask the source for (at
 * most 2, NULL-terminated into CONTEXTS[3]), and those of a second
 * connection that answers about the selection's map alone (MAP_CONTEXTS[2],
 * empty if none is wanted); then block status, a window at a time, into
 * the work queue. */
bool select_init(Copier *c, const char **contexts, const char **map_contexts,
                 GError **error);
/* Ask about the next windows, as many as may be in flight. */
void select_ask(Copier *c);
/* Plan from the answers that arrived, in window order. */
void select_plan(Copier *c);
/* Whether a question is still out (or an answer not planned yet). */
bool select_busy(const Copier *c);
void select_free(Copier *c);
bool select_chain_connect(Copier *c, GSourceFunc pump, GError **error);

/* Release of copied regions (release.c). */
void release_range(Copier *c, guint64 offset, guint64 length);
void release_step(Copier *c, gint64 now);
bool release_idle(Copier *c);

/* Guest-write notices (notices.c); PUMP runs on each reply. */
bool notices_connect(Copier *c, GSourceFunc pump, GError **error);
void notices_step(Copier *c);

/* Guest-aware pacing (pacing.c). */
void pacing_step(Copier *c, gint64 now);
void pacing_end(Copier *c);

/* The block digests of CHUNK: of BUF, or of zeros if NULL (blockhash.c). */
bool digests_write(Copier *c, const Chunk *chunk, const guint8 *buf);
/* The digests of a zero block of a disk of SIZE bytes: ZERO of a whole
 * one, TAIL of its last block (shorter if SIZE is not a multiple). */
void digests_zero(guint64 size, guint8 zero[COPIER_DIGEST_LEN],
                  guint8 tail[COPIER_DIGEST_LEN]);

#endif /* QBK_COPIER_INTERNAL_H */
