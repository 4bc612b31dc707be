/* db_resolve: host names of a conninfo, resolved off the loop for db_pool.
 *
 * PQconnectStartParams resolves a host name with a blocking getaddrinfo, so db_pool resolves
 * every host name of the conninfo first with uv_getaddrinfo (thread pool) and passes the
 * addresses as hostaddr (host stays for TLS, Kerberos and .pgpass). Unix-socket paths and
 * numeric addresses need no lookup. */
#ifndef TICKETD_DB_RESOLVE_H
#define TICKETD_DB_RESOLVE_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "limits.h"

struct db_hosts {
    char *hosts[DBP_HOSTS_MAX]; /* every host of the list; lookup[i]: a name to resolve */
    bool lookup[DBP_HOSTS_MAX];
    int n;                      /* 0: no host name to resolve (libpq takes the conninfo as is) */
    char *ports[DBP_HOSTS_MAX]; /* the port list when it has one entry per host, else NULL */
};

/* The addresses found for each host (naddrs[i] = 0: no lookup, the host is used as given). */
struct db_addrs {
    char addrs[DBP_HOSTS_MAX][DBP_ADDRS_PER_HOST][DBP_ADDR_MAX];
    int naddrs[DBP_HOSTS_MAX];
};

/* Finds the host list (conninfo, else PGHOST) and marks the names that need a lookup.
 * Leaves h->n = 0 when hostaddr is given already or the list is odd (an empty entry, too
 * many hosts): libpq then resolves by itself, blocking, as before. */
void db_hosts_parse(struct db_hosts *h, const char *conninfo);
void db_hosts_free(struct db_hosts *h);

/* The host, hostaddr and port lists for PQconnectStartParams: a name with k addresses
 * becomes k entries of host (the name), hostaddr (one address each) and, when it is a list,
 * port; libpq tries them in order. */
void db_hosts_lists(const struct db_hosts *h, const struct db_addrs *a, char *host,
                    char *hostaddr, size_t len, char *port, size_t portlen);

/* Called on the loop with the numeric addresses of the name (n of them, 0 when it failed:
 * status is then the libuv error, or 0 for "no address"). */
typedef void (*db_resolved_fn)(void *ud, unsigned gen, int status,
                               const char (*addrs)[DBP_ADDR_MAX], int n);

/* Resolves name on the thread pool; cb(ud, gen, ...) runs exactly once, on a later turn,
 * unless this returns a libuv error (< 0). */
int db_resolve(uv_loop_t *loop, const char *name, db_resolved_fn cb, void *ud, unsigned gen);

#endif
