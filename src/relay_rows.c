/* relay_rows: the relay's map of rows in hand (open addressing, linear probing,
 * backward-shift deletion; ids are never 0). */
#include "relay_rows.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static size_t slot_of(const struct relay_rows *m, int64_t id)
{
    uint64_t h = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (m->cap - 1);
}

struct row *relay_rows_find(struct relay_rows *m, int64_t id)
{
    if (!m->cap) return NULL;
    for (size_t i = slot_of(m, id);; i = (i + 1) & (m->cap - 1)) {
        if (m->slots[i].id == id) return &m->slots[i];
        if (m->slots[i].id == 0) return NULL;
    }
}

static int rows_grow(struct relay_rows *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 1024;
    struct row *ns = calloc(ncap, sizeof *ns);
    if (!ns) return -ENOMEM;
    struct relay_rows nm = {.slots = ns, .cap = ncap, .count = 0};
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].id) continue;
        size_t j = slot_of(&nm, m->slots[i].id);
        while (ns[j].id) j = (j + 1) & (ncap - 1);
        ns[j] = m->slots[i];
        nm.count++;
    }
    free(m->slots);
    *m = nm;
    return 0;
}

struct row *relay_rows_insert(struct relay_rows *m, int64_t id)
{
    if ((m->count + 1) * 2 > m->cap && rows_grow(m) != 0) return NULL;
    size_t i = slot_of(m, id);
    while (m->slots[i].id && m->slots[i].id != id) i = (i + 1) & (m->cap - 1);
    if (!m->slots[i].id) {
        memset(&m->slots[i], 0, sizeof m->slots[i]);
        m->slots[i].id = id;
        m->count++;
    }
    return &m->slots[i];
}

void relay_rows_remove(struct relay_rows *m, int64_t id)
{
    struct row *r = relay_rows_find(m, id);
    if (!r) return;
    size_t i = (size_t)(r - m->slots), mask = m->cap - 1;
    m->slots[i].id = 0;
    m->count--;
    /* Shift later members of the probe run back so lookups never stop early. */
    for (size_t j = (i + 1) & mask; m->slots[j].id; j = (j + 1) & mask) {
        size_t home = slot_of(m, m->slots[j].id);
        bool movable = (j > i) ? (home <= i || home > j) : (home <= i && home > j);
        if (movable) {
            m->slots[i] = m->slots[j];
            m->slots[j].id = 0;
            i = j;
        }
    }
}


int relay_grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    void *n = realloc(*arr, ncap * elem);
    if (!n) return -ENOMEM;
    *arr = n;
    *cap = ncap;
    return 0;
}

void relay_rows_clear(struct relay_rows *m)
{
    if (m->cap) memset(m->slots, 0, m->cap * sizeof *m->slots);
    m->count = 0;
}
