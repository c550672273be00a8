/*
 * dataserver.h -- the bridge's data port, served by a native thread.
 *
 * A partitioned bridge's workers send their requests to the owner's data port
 * (vela/bridge/dataport.py has the wire format: framing, the connection's
 * nonce, header tags, HMAC-SHA256 over the request's context and payload). This
 * thread owns the listener and every connection: it accepts, sends the
 * challenge, checks each header tag before buffering a body, and answers a
 * worker's get of a key in a partition the bridge says it may serve from its
 * table (the partition is its own and nothing is being handed to it) without
 * a Python step, reading the shared table directly. Every other request, and
 * any message it does not fully read, goes to the bridge's Python loop as it
 * arrived (vela_ds_take), which answers it with vela_ds_send.
 */
#ifndef VELA_DATASERVER_H
#define VELA_DATASERVER_H

#include <stddef.h>
#include <stdint.h>

#include "vela.h"

#define VELA_DS_NONCE 16
#define VELA_DS_CONTEXT (VELA_DS_NONCE + 8) /* the nonce, then the request's number (u64 BE) */

typedef struct vela_dataserver vela_dataserver;

/* What the Python loop is handed: a request (its connection, context, MAC and
 * payload), or word that a connection closed. */
enum vela_ds_kind { VELA_DS_REQUEST, VELA_DS_CLOSED };

typedef struct vela_ds_item {
    struct vela_ds_item *next;
    enum vela_ds_kind kind;
    uint64_t conn;
    uint8_t context[VELA_DS_CONTEXT];
    uint32_t mac_len, payload_len;
    uint8_t data[]; /* the MAC, then the payload */
} vela_ds_item;

enum vela_ds_counter { VELA_DS_MALFORMED, VELA_DS_UNAUTHENTICATED, VELA_DS_SERVED, VELA_DS_BYTES_IN,
                       VELA_DS_COUNTERS };

/* A server over a listening socket (it stays the caller's to close) for messages
 * of version `protocol` (vela/bridge/protocol.py's), or NULL with errno. */
vela_dataserver *vela_ds_new(int listen_fd, const uint8_t *secret, size_t secret_len, uint32_t max_conns,
                             uint32_t max_request, uint32_t protocol);
int vela_ds_start(vela_dataserver *ds);
/* Stops the thread and closes every connection; then frees. */
void vela_ds_free(vela_dataserver *ds);
/* Readable when items wait for the Python loop (an eventfd). */
int vela_ds_notify_fd(const vela_dataserver *ds);
/* The waiting items, oldest first (each the caller's to free()). */
vela_ds_item *vela_ds_take(vela_dataserver *ds);
/* Queue `len` bytes to send on connection `conn`; 0, or -1 when it is gone. */
int vela_ds_send(vela_dataserver *ds, uint64_t conn, const uint8_t *data, size_t len);
/* The native thread answers gets until `ns` from now on CLOCK_MONOTONIC, and hands
 * them to the Python loop after: a loop that stalled (SIGSTOP, a frozen VM) may have
 * been declared dead and its partitions taken over, which only it can tell
 * (the bridge renews this every turn of its loop, with its partition table's epoch,
 * which the replies carry). */
void vela_ds_serve_for(vela_dataserver *ds, uint64_t ns, uint64_t epoch);
/* Who answers: the bridge's node id and incarnation (the replies' "from" and "inc"). */
void vela_ds_set_identity(vela_dataserver *ds, uint32_t node_id, uint64_t incarnation);
/* A cache served here: its table (which must outlive the server), partitions,
 * and which of them gets may be served from the table (`servable`, a flag per
 * partition; NULL: none). Called again to change them; -1 on ENOMEM. */
int vela_ds_set_cache(vela_dataserver *ds, const char *name, vela_table *t, uint32_t parts,
                      const uint8_t *servable);
void vela_ds_counters(vela_dataserver *ds, uint64_t out[VELA_DS_COUNTERS]);
/* Gets of the cache served natively so far (0 for a cache not set). */
uint64_t vela_ds_served(vela_dataserver *ds, const char *name);

#endif
