/*
 * stats.c -- lock-free counters: each process counts in a slot of its own
 * (one cache-line pair, no sharing with other writers), stats() sums them.
 * A slot of a process that died is taken over with its counts, so totals
 * never go back; more than VELA_STAT_SLOTS live processes share the last slot.
 */
#include <unistd.h>

#include "vela.h"

void vela_stats_attach(vela_table *t)
{
    uint32_t pid = (uint32_t)getpid();
    uint64_t start = vela_proc_start_time(pid);
    t->my_pid = pid;
    t->my_start = start;
    vela_slot *fallback = &t->slots[VELA_STAT_SLOTS - 1];
    /* Already ours (another handle of this process)? */
    for (uint32_t i = 0; i < VELA_STAT_SLOTS; i++) {
        vela_slot *sl = &t->slots[i];
        if (__atomic_load_n(&sl->pid, __ATOMIC_ACQUIRE) == pid && sl->start_time == start) {
            t->my_slot = sl;
            return;
        }
    }
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < VELA_STAT_SLOTS - 1; i++) {
            vela_slot *sl = &t->slots[i];
            uint32_t owner = __atomic_load_n(&sl->pid, __ATOMIC_ACQUIRE);
            /* pass 0: free slots; pass 1: slots of dead processes */
            if ((pass == 0 && owner != 0) || (pass == 1 && (owner == 0 || vela_proc_alive(owner, sl->start_time))))
                continue;
            if (__atomic_compare_exchange_n(&sl->pid, &owner, pid, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                sl->start_time = start;
                t->my_slot = sl;
                return;
            }
        }
    }
    t->my_slot = fallback;
}

void vela_stats_sum(vela_table *t, uint64_t out[VELA_STAT_COUNT])
{
    memset(out, 0, sizeof(uint64_t) * VELA_STAT_COUNT);
    for (uint32_t i = 0; i < VELA_STAT_SLOTS; i++)
        for (int c = 0; c < VELA_STAT_COUNT; c++)
            out[c] += __atomic_load_n(&t->slots[i].counter[c], __ATOMIC_RELAXED);
}

void vela_stats_reset(vela_table *t)
{
    for (uint32_t i = 0; i < VELA_STAT_SLOTS; i++)
        for (int c = 0; c < VELA_STAT_COUNT; c++)
            __atomic_store_n(&t->slots[i].counter[c], 0, __ATOMIC_RELAXED);
}
