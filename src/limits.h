/* limits: every fixed cap in one place (curl's DYN_* habit): sizes, counts and the longest
 * waits. Caps that operators tune are settings in config.c; these are the fixed ones. (The
 * DLQ's and the admin tools' caps join here as those modules are split.) */
#ifndef TICKETD_LIMITS_H
#define TICKETD_LIMITS_H

#define EVENT_ID_MAX_CHARS 64        /* [A-Za-z0-9._-]{1,64} */
#define NAME_MAX_CHARS 100           /* UTF-8 code points */
#define NAME_MAX_BYTES (NAME_MAX_CHARS * 4)
#define EMAIL_MAX_BYTES 254          /* RFC 5321 path limit */
#define PHONE_DIGITS_MAX 11          /* 01X + 3..4 + 4 digits */
#define SEATS_MIN 1
#define SEATS_MAX 4
#define IDEMPOTENCY_KEY_MAX_BYTES 128
#define REQUEST_BODY_MAX_DEFAULT (16 * 1024)   /* SPEC: bodies over 16 KiB -> 413 */
#define UUID_STR_LEN 36
#define STRBUF_MAX_DEFAULT ((size_t)64 * 1024 * 1024) /* a strbuf without its own cap */

/* PostgreSQL pool (db_pool.c, db_resolve.c) */
#define DBP_MAX_STATEMENTS 32         /* prepared statements per pool */
#define DBP_CONNECT_TIMEOUT_MS 10000  /* one connection attempt, resolution included */
#define DBP_DEFAULT_QUEUE_MAX 4096    /* queries waiting for a connection, unless set */
#define DBP_REASON_MAX 256            /* bytes of the last failure kept for the log */
#define DBP_HOSTS_MAX 16              /* comma-separated hosts of a conninfo */
#define DBP_ADDR_MAX 64               /* one numeric address */
#define DBP_ADDRS_PER_HOST 4          /* addresses of one name tried, in the resolver's order */

/* HTTP (http_parse.c, http_server.c) */
#define HTTP_REQ_INLINE_BYTES 2048    /* request bytes kept inline before the arena */
#define HTTP_ARENA_BLOCK_BYTES 4096
#define HTTP_REQ_CACHE_MAX 256        /* freed requests kept for reuse */
#define HTTP_BACKLOG 65535            /* the kernel caps it at net.core.somaxconn */
#define HTTP_READ_BUF_BYTES 65536
#define HTTP_WRITE_BATCH 64           /* responses per write */
#define HTTP_LINGER_MS 2000           /* draining a refused body before close, at most */
#define HTTP_MAX_REJECTING 64         /* connections being refused at once */
#define HTTP_WRITE_CACHE_MAX 64       /* freed write requests kept for reuse */

/* outbox relay (outbox_relay.c, relay_lease.c) */
#define RELAY_LEASE_POLL_MAX_MS 1000  /* a standby tries to claim at least this often */
#define RELAY_RETENTION_BATCH 1000    /* outbox rows deleted per statement */
#define RELAY_MARK_BATCH_MAX 5000     /* marks (or failures) per statement */
#define RELAY_BACKOFF_CAP_MS 60000    /* cap of the doubling retry backoff */
#define RELAY_CLOSE_WAIT_MAX_MS 10000 /* waiting for rows in flight at shutdown, at most */
#define RELAY_ERR_MAX 200             /* bytes of a delivery error kept in outbox.last_error */

/* Kafka (kafka_common.c, kafka_mock.c) */
#define KAFKA_PROP_NAME_MAX 128       /* a property name echoed back in an error (never values) */
#define MOCK_CMD_LINE_MAX 256         /* one control command of `ticketd kafka-mock` */

/* consumer (consumer.c) */
#define PART_WINDOW 256               /* events per partition in hand (parsed, handed out) */
/* Flow control. Fetched, unfinished events in all partitions: above INHAND_HIGH the
 * partitions holding more than their window are paused, below INHAND_LOW resumed. Pausing is
 * kept rare on purpose: librdkafka drops a paused partition's prefetched messages and takes
 * ~0.5-1 s to fetch again after the resume (measured: a per-partition limit of 512 capped
 * the consumer at ~6,000 events/s with 12 partitions). */
#define INHAND_HIGH 32768
#define INHAND_LOW 16384
#define COMMIT_INTERVAL_MS 200        /* finished offsets are committed at most this often */
#define POLL_INTERVAL_MS 1000         /* serve the consumer even when idle (max.poll.interval.ms) */
#define CLOSE_DRAIN_MAX_MS 10000      /* wait for work in flight at shutdown, at most */
#define CLOSE_KAFKA_MAX_MS 10000      /* wait for the asynchronous consumer close, at most */
#define CONSUMER_DRAIN_POLL_MS 20              /* how often a draining consumer looks at what is in flight */
#define BACKOFF_MAX_MS 60000          /* cap of the exponential backoff */
#define DB_WAIT_MIN_MS 200            /* waits for our own database: first ... */
#define DB_WAIT_MAX_MS 10000          /* ... and longest (doubling, with jitter) */
#define FETCH_WAIT_MAX_MS "50"        /* see consumer_start */
#define CONSUMER_DB_POOL 4            /* PostgreSQL connections of the consumer */
#define DLQ_MESSAGE_MAX 1000          /* bytes of error message kept (DLQ header and row, marks) */

/* effects (effects.c, effects_batch.c) */
#define POINTS_BATCH_CUT 1024         /* events per points statement */
#define MARKS_BATCH_CUT 2048          /* done marks per statement */
#define STATEMENTS_INFLIGHT 2         /* points (and, separately, marks) statements in flight */
#define ORPHAN_MARK_TRIES 3           /* a released or detached run's done marks: statements tried */

/* logging and validation */
#define LOG_LINE_MAX 4096             /* one log line, longer ones are cut */
#define JSON_MAX_DEPTH 16             /* nesting of a request body */

#endif
