/* db_resolve: a conninfo's host list and its asynchronous lookup (see db_resolve.h). */
#include "db_resolve.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool needs_lookup(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    if (!*host || host[0] == '/' || host[0] == '@') return false; /* default or unix socket */
    return inet_pton(AF_INET, host, buf) != 1 && inet_pton(AF_INET6, host, buf) != 1;
}

/* Splits a comma list into out[] (copies); returns the count, or -1 when it has more than
 * DBP_HOSTS_MAX entries or an empty one. */
static int split_list(const char *list, char **out)
{
    int n = 0;
    for (const char *p = list;; n++) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        while (len && *p == ' ') p++, len--;
        if (n == DBP_HOSTS_MAX || len == 0) goto bad;
        if (!(out[n] = strndup(p, len))) goto bad;
        if (!e) return n + 1;
        p = e + 1;
    }
bad:
    for (int i = 0; i < n; i++) {
        free(out[i]);
        out[i] = NULL;
    }
    return -1;
}

void db_hosts_free(struct db_hosts *h)
{
    for (int i = 0; i < DBP_HOSTS_MAX; i++) {
        free(h->hosts[i]);
        free(h->ports[i]);
        h->hosts[i] = h->ports[i] = NULL;
    }
    h->n = 0;
}

void db_hosts_parse(struct db_hosts *h, const char *conninfo)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &err);
    if (!opts) {
        PQfreemem(err);
        return; /* libpq reports the bad conninfo when connecting */
    }
    const char *host = NULL, *hostaddr = NULL, *port = NULL;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val || !*o->val) continue;
        if (strcmp(o->keyword, "host") == 0) host = o->val;
        else if (strcmp(o->keyword, "hostaddr") == 0) hostaddr = o->val;
        else if (strcmp(o->keyword, "port") == 0) port = o->val;
    }
    if (!host) host = getenv("PGHOST");
    if (!hostaddr) hostaddr = getenv("PGHOSTADDR");
    if (!port) port = getenv("PGPORT");
    int n = host && *host && !(hostaddr && *hostaddr) ? split_list(host, h->hosts) : -1;
    bool any = false;
    for (int i = 0; i < n; i++) any |= h->lookup[i] = needs_lookup(h->hosts[i]);
    int nports = any && port && strchr(port, ',') ? split_list(port, h->ports) : 0;
    if (any && (nports == 0 || nports == n)) h->n = n;
    else db_hosts_free(h);
    PQconninfoFree(opts);
}

void db_hosts_lists(const struct db_hosts *h, const struct db_addrs *a, char *host,
                    char *hostaddr, size_t len, char *port, size_t portlen)
{
    size_t hl = 0, al = 0, pl = 0;
    host[0] = hostaddr[0] = port[0] = '\0';
    for (int i = 0; i < h->n; i++) {
        int k = a->naddrs[i] > 0 ? a->naddrs[i] : 1;
        for (int j = 0; j < k; j++) {
            const char *sep = hl ? "," : "";
            hl += (size_t)snprintf(host + hl, len - hl, "%s%s", sep, h->hosts[i]);
            al += (size_t)snprintf(hostaddr + al, len - al, "%s%s", sep,
                                   a->naddrs[i] > 0 ? a->addrs[i][j] : "");
            if (h->ports[i])
                pl += (size_t)snprintf(port + pl, portlen - pl, "%s%s", sep, h->ports[i]);
            if (hl >= len || al >= len || pl >= portlen) return;
        }
    }
}

struct resolve_req {
    uv_getaddrinfo_t req;
    db_resolved_fn cb;
    void *ud;
    unsigned gen;
    char addrs[DBP_ADDRS_PER_HOST][DBP_ADDR_MAX];
};

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct resolve_req *r = (struct resolve_req *)req;
    int n = 0;
    for (struct addrinfo *ai = status == 0 ? res : NULL; ai && n < DBP_ADDRS_PER_HOST;
         ai = ai->ai_next) {
        const void *addr = ai->ai_family == AF_INET
                               ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                           : ai->ai_family == AF_INET6
                               ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                               : NULL;
        if (addr && inet_ntop(ai->ai_family, addr, r->addrs[n], DBP_ADDR_MAX)) n++;
    }
    if (res) uv_freeaddrinfo(res);
    r->cb(r->ud, r->gen, status, (const char(*)[DBP_ADDR_MAX])r->addrs, n);
    free(r);
}

int db_resolve(uv_loop_t *loop, const char *name, db_resolved_fn cb, void *ud, unsigned gen)
{
    struct resolve_req *r = malloc(sizeof *r);
    if (!r) return UV_ENOMEM;
    r->cb = cb;
    r->ud = ud;
    r->gen = gen;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = uv_getaddrinfo(loop, &r->req, on_resolved, name, NULL, &hints);
    if (rc < 0) free(r);
    return rc;
}
