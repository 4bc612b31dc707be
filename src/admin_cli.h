/* admin_cli (admin_cli_): the frame of the CLI commands `ticketd audit|trace|report` (the
 * command's own flags first, then the settings flags) and of `ticketd dlq`'s flags. */
#ifndef TICKETD_ADMIN_CLI_H
#define TICKETD_ADMIN_CLI_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdio.h>

#include "config.h"

struct admin_cli {
    const char *command;         /* "audit": messages say "ticketd audit: ..." */
    void (*usage)(FILE *out);
    char **rest;                 /* the command, then the arguments kept for cfg_load */
    int nrest;
    bool json;                   /* --json */
    int status;                  /* -1 while parsing goes on; else the exit status (0 after
                                    --help, 2 after a usage error, both already printed) */
};

/* 0, or -1 (out of memory). argc: how many arguments the command has. */
int admin_cli_init(struct admin_cli *cli, const char *command, void (*usage)(FILE *out),
                   int argc);
/* Takes "--name value" / "--name=value" at argv[*i] into *value; true when it matched (a
 * missing value is a usage error: cli->status becomes 2). */
bool admin_cli_flag(struct admin_cli *cli, int argc, char **argv, int *i, const char *name,
                    const char **value);
/* Any other argument: --json, --help/-h (usage on stdout, status 0), or kept for cfg_load. */
void admin_cli_other(struct admin_cli *cli, char *arg);

/* A tool run for the CLI (cfg->kafka_brokers is set): the report goes to human_out or
 * *json_out; returns how much it found (>= 0), -1 on error or -2 on bad options (err). */
typedef int (*admin_cli_run_fn)(const struct cfg *cfg, const void *opts, FILE *human_out,
                                json_object **json_out, char *err, size_t errlen);

/* Unless parsing already ended (--help, usage error): loads the settings (environment, then
 * the kept flags), runs run(&cfg, opts, ...) and prints its report (human text on stdout, or
 * the JSON with --json) or its error. Frees cli. Returns the exit status: 0 after --help, 2 on
 * any error (printed; without Kafka brokers the hint names http_example, the admin URL that
 * answers the same), else if_found when run found something and if_none when not. */
int admin_cli_run(struct admin_cli *cli, const char *http_example, admin_cli_run_fn run,
                  const void *opts, int if_found, int if_none);

/* "--name value" / "--name=value" at argv[*i]: true when it matched; a missing value prints
 * "ticketd: --name needs a value" and sets *bad. */
bool admin_take_flag(int argc, char **argv, int *i, const char *name, const char **value,
                     bool *bad);

#endif
