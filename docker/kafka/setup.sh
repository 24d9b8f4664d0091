#!/usr/bin/env bash
# kafka-setup (docker-compose.yml): the users and ACLs of SPEC §11 on the Compose broker.
#
# Runs once per `make up`, after the broker is healthy, as the super user `admin` over the
# broker's INTERNAL listener (SASL PLAIN, the passwords of the broker's JAAS file). It gives
# the users central, cp and driver their SCRAM-SHA-512 passwords from .env (creating them, or
# changing them when .env changed) and grants each what §11's table lists, on the topics
# named ${CENTRAL_TOPIC_PREFIX}<topic>. Adding an ACL that exists changes nothing, so running
# it again is harmless. The same table as evcharging/devtools/kafka_broker/sasl.py.
set -euo pipefail

BIN="${KAFKA_BIN:-/opt/kafka/bin}"
BOOTSTRAP="${KAFKA_SETUP_BOOTSTRAP:-kafka:9094}"
PREFIX="${CENTRAL_TOPIC_PREFIX:-}"
: "${KAFKA_ADMIN_PASSWORD:?is not set: run make up, which writes it into .env}"

config="$(mktemp)"
trap 'rm -f "$config"' EXIT
chmod 600 "$config"
cat >"$config" <<PROPERTIES
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="${KAFKA_ADMIN_PASSWORD}";
PROPERTIES

for user in central cp driver; do
  variable="KAFKA_${user^^}_PASSWORD"
  password="${!variable:-}"
  if [[ -z "$password" ]]; then
    echo "$variable is not set: run make up, which writes it into .env" >&2
    exit 1
  fi
  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$config" \
    --alter --entity-type users --entity-name "$user" \
    --add-config "SCRAM-SHA-512=[password=${password}]"
done

acl() {
  "$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$config" \
    --add --force "$@" >/dev/null
}
topics() {
  for topic in "$@"; do printf -- '--topic\n%s\n' "${PREFIX}${topic}"; done
}
all=(driver.requests driver.updates central.commands cp.status cp.telemetry)
mapfile -t every_topic < <(topics "${all[@]}")

# Metadata only: every service sees that the topics exist (names, partitions).
acl --allow-principal User:central --allow-principal User:cp --allow-principal User:driver \
  --operation Describe "${every_topic[@]}"
# central: writes commands and driver updates, reads requests and the CPs' reports, creates
# and configures the topics, consumes in its groups and writes in its transactions.
mapfile -t args < <(topics central.commands driver.updates)
acl --allow-principal User:central --operation Write "${args[@]}"
mapfile -t args < <(topics driver.requests cp.status cp.telemetry)
acl --allow-principal User:central --operation Read "${args[@]}"
acl --allow-principal User:central --operation Create --operation DescribeConfigs \
  --operation AlterConfigs "${every_topic[@]}"
acl --allow-principal User:central --operation Read --operation Describe \
  --resource-pattern-type prefixed --group ev-central
acl --allow-principal User:central --operation Write --operation Describe \
  --resource-pattern-type prefixed --transactional-id ev-central
acl --allow-principal User:central --operation IdempotentWrite --cluster
# cp (engines, fleets, the OCPP gateway): writes status and telemetry, reads commands.
mapfile -t args < <(topics cp.status cp.telemetry)
acl --allow-principal User:cp --operation Write "${args[@]}"
mapfile -t args < <(topics central.commands)
acl --allow-principal User:cp --operation Read "${args[@]}"
# driver (drivers, the load generator): writes requests, reads its updates.
mapfile -t args < <(topics driver.requests)
acl --allow-principal User:driver --operation Write "${args[@]}"
mapfile -t args < <(topics driver.updates)
acl --allow-principal User:driver --operation Read "${args[@]}"

echo "kafka-setup: users central, cp, driver and the ACLs of SPEC §11 are in place" \
  "(topic prefix '${PREFIX}')"
