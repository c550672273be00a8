/*
 * lock.c -- robust process-shared mutexes and what happens when an owner dies.
 *
 * Lock order (the whole of it):
 *   1. at most one stripe lock is taken by waiting;
 *   2. then, optionally, the heap lock;
 *   3. while holding the heap lock, other stripes may be TRY-locked (eviction,
 *      giving arenas back: vela_stripe_trylock_holding_heap); a busy stripe is
 *      skipped, never waited for.
 *   Inspection try-locks stripes holding nothing (vela_stripe_trylock_without_heap).
 *   The change log's lock is taken with at most one stripe lock held (a
 *   record is appended while its key's stripe is still locked), never with
 *   the heap lock; nothing is locked while holding it.
 *   The admin lock is taken alone. check() takes every stripe in ascending
 *   order, then the heap: it holds no heap lock while it waits for a stripe,
 *   and everyone else only try-locks a second stripe, so no cycle can form.
 *
 * Every wait is bounded by the handle's lock timeout (VELA_ETIMEOUT names the
 * holder), and releases the interpreter lock while it waits.
 *
 * EOWNERDEAD: the previous owner died holding the lock. The new owner repairs
 * what the lock protects (repair.c for a stripe, heap.c for the heap), then
 * marks the mutex consistent. If the repair fails the table is poisoned and
 * the mutex left unrecoverable: every later call fails with VELA_EPOISONED
 * instead of working on a broken table.
 */
#include <errno.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "vela.h"

int vela_debug_stall_phase = 0;

void vela_debug_stall(int phase)
{
    if (vela_debug_stall_phase == phase)
        for (;;)
            pause();
}

vela_err vela_lock_init(vela_lock *l)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(&l->mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    l->holder_pid = 0;
    l->recoveries = 0;
    if (rc != 0) {
        errno = rc;
        return vela_fail_sys("pthread_mutex_init", "making a robust process-shared mutex");
    }
    return VELA_OK;
}

/* Wait for l; returns 0, EOWNERDEAD, or an error code. */
static int acquire(vela_table *t, vela_lock *l)
{
    int rc = pthread_mutex_trylock(&l->mutex);
    if (rc != EBUSY)
        return rc;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += t->lock_timeout_ns / 1000000000LL;
    deadline.tv_nsec += t->lock_timeout_ns % 1000000000LL;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    void *token = vela_wait_begin();
    do
        rc = pthread_mutex_timedlock(&l->mutex, &deadline);
    while (rc == EINTR);
    vela_wait_end(token);
    return rc;
}

static vela_err lock_failed(vela_table *t, vela_lock *l, int rc, const char *what)
{
    if (rc == ETIMEDOUT)
        return vela_fail(VELA_ETIMEOUT, "%s stayed locked by pid %u for more than %.1f s "
                         "(is that process stopped?)", what, l->holder_pid, t->lock_timeout_ns / 1e9);
    if (rc == ENOTRECOVERABLE) {
        t->hdr->poisoned = 1;
        return vela_fail(VELA_EPOISONED, "%s could not be repaired after a crash; "
                         "destroy and recreate the cache", what);
    }
    errno = rc;
    return vela_fail_sys("pthread_mutex_lock", what);
}

static void release(vela_lock *l);

static vela_err check_poison(vela_table *t)
{
    if (t->hdr->poisoned)
        return vela_fail(VELA_EPOISONED, "the table was marked broken after a failed repair; "
                         "destroy and recreate the cache");
    return VELA_OK;
}

/* Repair stripe s (locked by this process) after an owner that died. */
static vela_err repair_stripe(vela_table *t, uint32_t s, int heap_held)
{
    vela_stripe *st = &t->stripes[s];
    vela_err err = vela_stripe_repair(t, s, heap_held);
    if (err != VELA_OK) {
        t->hdr->poisoned = 1;
        return err;
    }
    st->repair_due = 0;
    st->lock.recoveries++;
    vela_count(t, VELA_STAT_LOCK_RECOVERIES, 1);
    return VELA_OK;
}

/* The stripe lock was just taken (rc 0 or EOWNERDEAD): repair what a dead
 * owner left, now or as deferred by inspection (repair_due). */
static vela_err after_acquire(vela_table *t, uint32_t s, int rc, int heap_held)
{
    vela_lock *l = &t->stripes[s].lock;
    l->holder_pid = t->my_pid;
    if (rc == EOWNERDEAD) {
        vela_err err = repair_stripe(t, s, heap_held);
        if (err != VELA_OK) {
            pthread_mutex_unlock(&l->mutex); /* without consistent: unrecoverable */
            return err;
        }
        pthread_mutex_consistent(&l->mutex);
    } else if (__builtin_expect(t->stripes[s].repair_due, 0)) {
        vela_err err = repair_stripe(t, s, heap_held);
        if (err != VELA_OK) {
            release(l); /* the table is poisoned: nobody works on it again */
            return err;
        }
    }
    return VELA_OK;
}

vela_err vela_stripe_lock(vela_table *t, uint32_t s)
{
    vela_err err = check_poison(t);
    if (err != VELA_OK)
        return err;
    int rc = acquire(t, &t->stripes[s].lock);
    if (rc != 0 && rc != EOWNERDEAD)
        return lock_failed(t, &t->stripes[s].lock, rc, "a stripe lock");
    return after_acquire(t, s, rc, 0);
}

int vela_stripe_trylock_holding_heap(vela_table *t, uint32_t s)
{
    int rc = pthread_mutex_trylock(&t->stripes[s].lock.mutex);
    if (rc != 0 && rc != EOWNERDEAD)
        return 0;
    return after_acquire(t, s, rc, 1) == VELA_OK;
}

vela_trylock vela_stripe_trylock_without_heap(vela_table *t, uint32_t s)
{
    vela_stripe *st = &t->stripes[s];
    vela_lock *l = &st->lock;
    int rc = pthread_mutex_trylock(&l->mutex);
    if (rc == EOWNERDEAD) {
        /* Repair may free blocks into the heap, and this caller holds no heap
         * lock and must not wait for it: leave the repair to the next locker.
         * holder_pid keeps naming the dead owner for the diagnostics. */
        st->repair_due = 1;
        pthread_mutex_consistent(&l->mutex);
        pthread_mutex_unlock(&l->mutex);
        return VELA_TRY_OWNER_DEAD;
    }
    if (rc != 0)
        return VELA_TRY_BUSY;
    if (st->repair_due) {
        pthread_mutex_unlock(&l->mutex);
        return VELA_TRY_OWNER_DEAD;
    }
    l->holder_pid = t->my_pid;
    return VELA_TRY_LOCKED;
}

void vela_stripe_unlock(vela_table *t, uint32_t s)
{
    release(&t->stripes[s].lock);
}

vela_err vela_heap_lock(vela_table *t)
{
    vela_lock *l = &t->hdr->heap.lock;
    int rc = acquire(t, l);
    if (rc == EOWNERDEAD) {
        l->holder_pid = t->my_pid;
        vela_err err = vela_heap_repair(t);
        if (err != VELA_OK) {
            t->hdr->poisoned = 1;
            pthread_mutex_unlock(&l->mutex);
            return err;
        }
        pthread_mutex_consistent(&l->mutex);
        l->recoveries++;
        vela_count(t, VELA_STAT_LOCK_RECOVERIES, 1);
        return VELA_OK;
    }
    if (rc != 0)
        return lock_failed(t, l, rc, "the heap lock");
    l->holder_pid = t->my_pid;
    return VELA_OK;
}

void vela_heap_unlock(vela_table *t)
{
    release(&t->hdr->heap.lock);
}

/* A lock whose protected state is valid after any single store, so a dead
 * owner leaves nothing to repair: the change log (a record is published by
 * moving log_head last; half-written bytes are overwritten by the next writer)
 * and the admin lock (the sweeper fields). */
static vela_err take_plain(vela_table *t, vela_lock *l, const char *what)
{
    int rc = acquire(t, l);
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(&l->mutex);
        l->recoveries++;
        rc = 0;
    }
    if (rc != 0)
        return lock_failed(t, l, rc, what);
    l->holder_pid = t->my_pid;
    return VELA_OK;
}

static void release(vela_lock *l)
{
    l->holder_pid = 0;
    pthread_mutex_unlock(&l->mutex);
}

vela_err vela_log_lock(vela_table *t) { return take_plain(t, &t->hdr->log_lock, "the change log lock"); }
void vela_log_unlock(vela_table *t) { release(&t->hdr->log_lock); }
vela_err vela_admin_lock(vela_table *t) { return take_plain(t, &t->hdr->admin, "the admin lock"); }
void vela_admin_unlock(vela_table *t) { release(&t->hdr->admin); }
