/* limits: every fixed cap in one place (curl's DYN_* habit): sizes, counts and the longest
 * waits. Caps that operators tune are settings in config.c; these are the fixed ones. */
#ifndef TICKETD_LIMITS_H
#define TICKETD_LIMITS_H

/* A cap as text, for a statement: "LIMIT " LIMITS_STR(INGEST_PRUNE_BATCH). */
#define LIMITS_STR_(x) #x
#define LIMITS_STR(x) LIMITS_STR_(x)

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

/* HTTP (http_parse.c, http_server.c, http_client.c) */
#define HTTP_MAX_PIPELINED 64         /* requests queued per connection: a client's burst, not a flood */
#define HTTP_REQ_INLINE_BYTES 2048    /* request bytes kept inline before the arena */
#define HTTP_ARENA_BLOCK_BYTES 4096
#define HTTP_REQ_CACHE_MAX 256        /* freed requests kept for reuse */
#define HTTP_BACKLOG 65535            /* the kernel caps it at net.core.somaxconn */
#define HTTP_READ_BUF_BYTES 65536
#define HTTP_WRITE_BATCH 64           /* responses per write */
#define HTTP_LINGER_MS 2000           /* draining a refused body before close, at most */
#define HTTP_MAX_REJECTING 64         /* connections being refused at once */
#define HTTP_WRITE_CACHE_MAX 64       /* freed write requests kept for reuse */
#define HC_BODY_MAX 4096              /* a sink's answer kept for the log and the DLQ: its head says why */
#define HC_TIMEOUT_DEFAULT_MS 5000    /* an outgoing call given no timeout (connect and whole call) */

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

/* start-up and shutdown (main.c) */
#define MIGRATE_TIMEOUT_MS 30000      /* waiting for another process's migration lock, at most */
#define SHUTDOWN_WATCHDOG_EXTRA_MS 10000 /* after SHUTDOWN_GRACE, give up on a stuck close */
#define LOG_FLUSH_EXIT_MS 2000        /* writing serve's buffered lines at exit, unless stderr is stuck */

/* idempotency-key expiry (ingest.c) */
#define INGEST_PRUNE_BATCH 1000       /* applications walked per statement: a short lock-free scan */
#define INGEST_PRUNE_START_BACK 100000 /* first cursor: this many ids below the newest (older keys are long expired) */
#define INGEST_PRUNE_EVERY_MIN_MS 100   /* a quarter of the TTL, but not more often (a tiny test TTL) */
#define INGEST_PRUNE_EVERY_MAX_MS 60000 /* ... nor less often than a minute (a long TTL) */

/* admin tools: Kafka reader (admin_kafka.c) */
#define ADMIN_KAFKA_TIMEOUT_MS 10000  /* metadata, watermarks, committed offsets: one round trip, a loaded broker */
#define ADMIN_KAFKA_STALL_MS 20000    /* no message while below the high watermark: an error, not a hang */
#define ADMIN_KAFKA_WAIT_MS 200       /* one wait for the first message of a batch: short, so the stall clock runs */

/* admin tools: audit (audit.c, audit_render.c) */
#define AUDIT_LIST_MAX 1000           /* ids listed per category (counts stay exact): a readable report */
#define AUDIT_FETCH_ROWS 10000        /* rows per FETCH from a server-side cursor: memory flat on a big show */
#define AUDIT_LOOKUP_BATCH 512        /* unmatched messages looked up per query: one statement, bounded parameters */
#define AUDIT_DLQ_CHECK_MAX 100000    /* unhandled events checked against the DLQ topic; past it the audit says so */
#define AUDIT_DISTINCT_MAX (1 << 20)  /* missing ids deduplicated (16 MiB of slots at most); past it counts may repeat */
#define AUDIT_HUMAN_DETAILS 20        /* items printed per category in the human report: one screen */

/* admin tools: dead letters (dlq.c) and trace (trace.c) */
#define DLQ_LIST_DEFAULT 1000         /* dead letters listed by default */
#define DLQ_LIST_MAX 10000            /* ... and at most (?limit=, --limit): one answer in memory */
#define DLQ_READ_TIMEOUT_MS 30000     /* reading the DLQ topic up to its high watermarks, at most */
#define DLQ_FLUSH_TIMEOUT_MS 30000    /* a replay waiting for the broker's acknowledgements, at most */
#define DLQ_VALUE_SHOWN_MAX 4096      /* bytes of a dead letter's value listed: an event is far smaller */
#define DLQ_HEADER_VALUE_MAX 1024     /* a dlq_* header read back: dlq_error_message is at most 999 bytes */
#define TRACE_ROWS_MAX 100            /* applications, outbox rows and topic matches shown: one phone's story */

/* admin tools: post-event report (report.c) */
#define REPORT_LIST_MAX 1000          /* dead letters / applications listed (counts stay exact) */
#define REPORT_BUCKETS_MAX 600        /* timeline buckets: 1 s each, wider for a long opening */
#define REPORT_ERROR_TEXT_MAX 160     /* bytes of an error message shown: one table cell */
#define REPORT_CLUSTER_ID_TIMEOUT_MS 5000 /* asking the brokers for the cluster id; the report says unknown past it */
#define REPORT_SVG_MARKERS_MAX 60     /* a short opening: dots on its few points, a line only past this */

/* logging and validation */
#define LOG_LINE_MAX 4096             /* one log line, longer ones are cut */
#define JSON_MAX_DEPTH 16             /* nesting of a request body */

#endif
