/*
 * A budget of requests in flight, shared by the copiers on one loop: the
 * disks of a VM copy at once, and together they never have more than
 * LIMIT requests out, nor more than LIMIT buffers (memory: LIMIT x chunk
 * size, whatever the number of disks). Buffers are pooled, not freed,
 * between requests.
 */
#include <stdlib.h>

#include "internal.h"

CopierBudget *copier_budget_new(guint limit, guint64 chunk_size)
{
    CopierBudget *b = g_new0(CopierBudget, 1);

    b->limit = limit;
    b->chunk_size = chunk_size;
    b->free = g_ptr_array_new_with_free_func(free);
    return b;
}

void copier_budget_free(CopierBudget *b)
{
    if (!b) {
        return;
    }
    g_assert(b->free->len == b->buffers); /* every buffer came back */
    g_ptr_array_unref(b->free);
    g_free(b);
}

guint8 *budget_take(CopierBudget *b)
{
    void *buf;

    if (b->free->len) {
        return g_ptr_array_steal_index_fast(b->free, b->free->len - 1);
    }
    if (b->buffers >= b->limit) {
        return NULL;
    }
    /* page aligned, ready for an O_DIRECT sink */
    if (posix_memalign(&buf, 4096, b->chunk_size) != 0) {
        return NULL;
    }
    b->buffers++;
    return buf;
}

void budget_give(CopierBudget *b, guint8 *buf)
{
    if (buf) {
        g_ptr_array_add(b->free, buf);
    }
}
