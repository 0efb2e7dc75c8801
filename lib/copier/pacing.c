/*
 * Guest-aware pacing: keep the mean latency of the copier's reads (which
 * wait in QEMU's queue with the guest's I/O) near the target by cutting
 * the requests allowed in flight in half when above it, and adding one
 * when below (AIMD), once per period. The window holds back only the cold
 * copy: ranges the guest writes around (notices) go at full width, as a
 * copy there spares the guest a copy-before-write (may_start, copier.c).
 */
#include "internal.h"

#define PACING_US (100 * 1000) /* one pacing decision per period */

void pacing_step(Copier *c, gint64 now)
{
    double mean_us;

    if (!c->opts.latency_target_us || now - c->pacing_since_us < PACING_US) {
        return;
    }
    c->window_integral += c->window * (now - c->pacing_since_us) / 1e6;
    c->pacing_since_us = now;
    if (c->paced_reads == 0) {
        return;
    }
    mean_us = (double)c->paced_read_us / c->paced_reads;
    c->paced_reads = c->paced_read_us = 0;
    if (mean_us > c->opts.latency_target_us && c->window > 1) {
        c->window = MAX(1, c->window / 2);
        c->stats.pacing_cuts++;
    } else if (mean_us < c->opts.latency_target_us && c->window < c->nreqs) {
        c->window++;
    } else {
        return;
    }
    c->stats.window_min = MIN(c->stats.window_min, c->window);
    c->stats.window_max = MAX(c->stats.window_max, c->window);
    copier_trace(c, "window %u %.0f", c->window, mean_us);
}

/* The copy ended: the time-weighted mean of the window. */
void pacing_end(Copier *c)
{
    gint64 now = g_get_monotonic_time();
    double seconds = (now - c->start_us) / 1e6;

    c->stats.window_mean = c->window;
    if (c->opts.latency_target_us && seconds > 0) {
        c->window_integral += c->window * (now - c->pacing_since_us) / 1e6;
        c->stats.window_mean = c->window_integral / seconds;
    }
}
