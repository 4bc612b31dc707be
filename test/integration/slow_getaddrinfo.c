/* LD_PRELOAD shim for test_db_resolve.py: getaddrinfo() of the name in SLOW_GAI_NAME sleeps
 * for the milliseconds written in the file SLOW_GAI_FILE (read at each call, so a test can
 * make a name slow after start-up) and then resolves 127.0.0.1. Other names pass through. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    static gai_fn real;
    if (!real) real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    const char *name = getenv("SLOW_GAI_NAME"), *file = getenv("SLOW_GAI_FILE");
    if (!node || !name || strcmp(node, name) != 0) return real(node, service, hints, res);
    long ms = 0;
    FILE *f = file ? fopen(file, "r") : NULL;
    if (f) {
        if (fscanf(f, "%ld", &ms) != 1) ms = 0;
        fclose(f);
    }
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    return real("127.0.0.1", service, hints, res);
}
