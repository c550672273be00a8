/*
 * lease.c -- stampede protection across the processes of a host.
 *
 * On a miss, get_or_fetch takes the key's lease in its stripe (a slot with
 * the key hash, holder pid and start time) and runs the fetch with no lock
 * held; later callers find the lease and sleep on its futex word, in shared
 * memory, so the holder's release wakes every process at once. Waiters wake
 * at least every `poll_ns` to check that the holder still lives (pid + start
 * time): a SIGKILLed holder is replaced within one poll. A waiter never
 * sleeps past its budget (stampede_timeout); then it fetches on its own.
 *
 * A release says how the fetch ended: stored (waiters read the value), failed
 * (the first waiter to lock takes the lease and retries), or fetched but not
 * storable (waiters fetch for themselves).
 */
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vela.h"

static vela_lease *leases_of(const vela_table *t, uint32_t s)
{
    return &t->leases[(uint64_t)s * VELA_LEASES_PER_STRIPE];
}

static void futex_wait(uint32_t *word, uint32_t expected, int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
    /* Not FUTEX_PRIVATE: the word is shared between processes. */
    syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake_all(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void take(vela_table *t, vela_lease *l, uint64_t hash)
{
    l->holder_pid = t->my_pid;
    l->holder_start = t->my_start;
    l->since_ns = vela_monotonic_ns();
    __atomic_store_n(&l->hash, hash, __ATOMIC_RELEASE);
}

/* Release a lease (stripe locked); the caller wakes the waiters after unlocking. */
static void release(vela_lease *l, uint32_t outcome)
{
    l->outcome = outcome;
    __atomic_store_n(&l->hash, 0, __ATOMIC_RELEASE);
    __atomic_add_fetch(&l->futex, 1, __ATOMIC_RELEASE);
}

/* A lease holder seen with the stripe unlocked. Its liveness is checked
 * (/proc, kill) with no lock held; the lease is taken over only if, locked
 * again, the slot still names that very holder. */
typedef struct holder {
    uint32_t pid;
    uint64_t start;
} holder;

static int same_holder(const vela_lease *l, holder h)
{
    return h.pid && l->holder_pid == h.pid && l->holder_start == h.start;
}

/* The first of these holders that no longer runs, or {0, 0}. */
static holder first_dead(const holder *seen, int n)
{
    for (int i = 0; i < n; i++)
        if (!vela_proc_alive(seen[i].pid, seen[i].start))
            return seen[i];
    return (holder){0, 0};
}

vela_err vela_fetch_begin(vela_table *t, const vela_key *k, int64_t budget_ns, int64_t poll_ns,
                          const vela_reader *reader, vela_fetch_status *status, vela_lease_token *token,
                          int *waited)
{
    uint32_t s = vela_stripe_of(t, k->hash);
    vela_lease *leases = leases_of(t, s);
    int64_t start = vela_monotonic_ns();
    int watched = -1;
    uint32_t watched_gen = 0;
    holder dead = {0, 0}; /* a holder found dead, unlocked, on the previous round */
    *waited = 0;
    token->stripe = s;
    token->hash = k->hash;
    for (;;) {
        vela_err err = vela_stripe_lock(t, s);
        if (err != VELA_OK)
            return err;
        uint32_t ref = vela_find(t, s, k, &err);
        if (err != VELA_OK)
            goto unlock;
        if (ref) {
            *status = VELA_FETCH_HIT;
            err = vela_read_locked(t, ref, reader);
            goto unlock;
        }
        *status = VELA_FETCH_ALONE;
        if (watched >= 0 && leases[watched].futex != watched_gen &&
            leases[watched].outcome == VELA_LEASE_UNSTORED && leases[watched].hash != k->hash)
            goto unlock; /* its holder fetched but could not store: fetch alone */
        int mine = -1, free_slot = -1;
        for (int i = 0; i < VELA_LEASES_PER_STRIPE; i++) {
            if (leases[i].hash == k->hash)
                mine = i;
            else if (free_slot < 0 && (leases[i].hash == 0 || same_holder(&leases[i], dead)))
                free_slot = i;
        }
        if (mine >= 0 && !same_holder(&leases[mine], dead)) {
            /* Someone fetches this key: check on them unlocked, then wait. */
            vela_lease *l = &leases[mine];
            holder h = {l->holder_pid, l->holder_start};
            uint32_t gen = __atomic_load_n(&l->futex, __ATOMIC_ACQUIRE);
            vela_stripe_unlock(t, s);
            if (!vela_proc_alive(h.pid, h.start)) {
                dead = h; /* take over if it still holds it, locked again */
                continue;
            }
            int64_t left = budget_ns - (vela_monotonic_ns() - start);
            if (budget_ns == 0 || left <= 0) {
                *status = budget_ns == 0 ? VELA_FETCH_BUSY : VELA_FETCH_TIMEOUT;
                return VELA_OK;
            }
            void *gil = vela_wait_begin();
            futex_wait(&l->futex, gen, left < poll_ns ? left : poll_ns);
            vela_wait_end(gil);
            *waited = 1;
            watched = mine;
            watched_gen = gen;
            continue;
        }
        if (mine >= 0)
            free_slot = mine; /* its holder died: take over at once */
        if (free_slot < 0) {
            /* All taken: look, unlocked, for a slot whose holder died. */
            holder seen[VELA_LEASES_PER_STRIPE];
            for (int i = 0; i < VELA_LEASES_PER_STRIPE; i++)
                seen[i] = (holder){leases[i].holder_pid, leases[i].holder_start};
            vela_stripe_unlock(t, s);
            if (!(dead = first_dead(seen, VELA_LEASES_PER_STRIPE)).pid)
                return VELA_OK; /* VELA_FETCH_ALONE: every holder lives */
            continue;
        }
        take(t, &leases[free_slot], k->hash);
        token->slot = (uint32_t)free_slot;
        *status = VELA_FETCH_MINE;
    unlock:
        vela_stripe_unlock(t, s);
        return err;
    }
}

vela_err vela_fetch_complete(vela_table *t, const vela_lease_token *token, const vela_put_args *a)
{
    vela_err err = vela_stripe_lock(t, token->stripe);
    if (err != VELA_OK)
        return err;
    uint64_t version = 0;
    vela_put_args b;
    if (a) {
        b = *a;
        b.version_out = &version;
    }
    vela_err put_err = a ? vela_do_put(t, token->stripe, &b) : VELA_OK;
    if (a && put_err == VELA_OK)
        vela_log_put(t, &b, version);
    vela_lease *l = &leases_of(t, token->stripe)[token->slot];
    int held = l->hash == token->hash && l->holder_pid == t->my_pid;
    if (held)
        release(l, !a ? VELA_LEASE_FAILED : put_err == VELA_OK ? VELA_LEASE_STORED : VELA_LEASE_UNSTORED);
    vela_stripe_unlock(t, token->stripe);
    if (held)
        futex_wake_all(&l->futex);
    if (a && put_err == VELA_OK)
        VELA_COUNT(t, VELA_STAT_WRITES);
    return put_err;
}

uint32_t vela_leases_release_pid(vela_table *t, uint32_t pid)
{
    uint32_t released = 0;
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        vela_lease *leases = leases_of(t, s);
        int any = 0;
        for (int i = 0; i < VELA_LEASES_PER_STRIPE; i++)
            any |= leases[i].hash && leases[i].holder_pid == pid;
        if (!any || vela_stripe_lock(t, s) != VELA_OK)
            continue;
        int woken[VELA_LEASES_PER_STRIPE] = {0};
        for (int i = 0; i < VELA_LEASES_PER_STRIPE; i++)
            if (leases[i].hash && leases[i].holder_pid == pid) {
                release(&leases[i], VELA_LEASE_FAILED);
                woken[i] = 1;
                released++;
            }
        vela_stripe_unlock(t, s);
        for (int i = 0; i < VELA_LEASES_PER_STRIPE; i++)
            if (woken[i])
                futex_wake_all(&leases[i].futex);
    }
    return released;
}

uint32_t vela_leases_held(vela_table *t)
{
    uint32_t n = 0;
    for (uint64_t i = 0; i < (uint64_t)(t->stripe_mask + 1) * VELA_LEASES_PER_STRIPE; i++)
        n += __atomic_load_n(&t->leases[i].hash, __ATOMIC_RELAXED) != 0;
    return n;
}
