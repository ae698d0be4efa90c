//! Deployment: the Kubernetes overlays rendered and validated offline
//! against the API schemas, the compose file and the Dockerfile checked
//! structurally, every configuration knob deployed (and nothing deployed
//! that the code does not read), and the server behaviour the manifests rely
//! on: the connection age that re-balances gRPC clients, and the health
//! command the containers' checks run.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_yaml::Value;
use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{BINARY, Backend, StackEnv, configuration_variables, repo_root, tools};

const OVERLAYS: &[&str] = &["dev", "prod"];
/// The gRPC services, their listen-address variables and ports.
const BACKENDS: &[(&str, &str, u64)] = &[
    ("auth", "FLASHMESH_AUTH_ADDR", 50051),
    ("catalog", "FLASHMESH_CATALOG_ADDR", 50052),
    ("order", "FLASHMESH_ORDER_ADDR", 50053),
];
const SERVICES: &[&str] = &["auth", "catalog", "order", "gateway"];
/// Compose services without a health check, and why.
const NO_HEALTHCHECK: &[(&str, &str)] = &[
    (
        "otel-collector",
        "the image holds the collector binary alone: no shell or HTTP client to probe with",
    ),
    (
        "jaeger",
        "a minimal image: no shell or HTTP client to probe with",
    ),
];

// ---- Kubernetes -------------------------------------------------------

/// `kubectl kustomize k8s/overlays/<overlay>`: the YAML text and its objects.
fn render(overlay: &str) -> (String, Vec<Value>) {
    let output = Command::new(tools().join("kubectl"))
        .args(["kustomize", &format!("k8s/overlays/{overlay}")])
        .current_dir(repo_root())
        .output()
        .expect("run kubectl");
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = String::from_utf8(output.stdout).expect("UTF-8 YAML");
    let objects = documents(&yaml);
    (yaml, objects)
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("valid YAML"))
        .filter(|value| !value.is_null())
        .collect()
}

fn example_secrets() -> Vec<Value> {
    let path = repo_root().join("k8s/secrets.example.yaml");
    documents(&std::fs::read_to_string(path).expect("k8s/secrets.example.yaml"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| o["kind"] == kind)
}

fn named<'a>(objects: &'a [Value], kind: &'a str, name: &str) -> &'a Value {
    of_kind(objects, kind)
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, found {value:?}"))
}

fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("expected a number, found {value:?}"))
}

fn list(value: &Value) -> &[Value] {
    value.as_sequence().map_or(&[], Vec::as_slice)
}

fn keys(value: &Value) -> impl Iterator<Item = String> + '_ {
    value
        .as_mapping()
        .into_iter()
        .flat_map(|m| m.keys())
        .map(|k| text(k).to_owned())
}

/// Whether a `matchLabels` selector selects a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels[text(k)] == *v)
}

/// The ConfigMap every workload reads, as a map.
fn config_map(objects: &[Value]) -> BTreeMap<String, String> {
    let config = of_kind(objects, "ConfigMap")
        .find(|o| text(&o["metadata"]["name"]).starts_with("flashmesh-config"))
        .expect("the flashmesh-config ConfigMap");
    keys(&config["data"])
        .map(|k| {
            let value = text(&config["data"][k.as_str()]).to_owned();
            (k, value)
        })
        .collect()
}

fn duration(config: &BTreeMap<String, String>, var: &str) -> Duration {
    let raw = config
        .get(var)
        .unwrap_or_else(|| panic!("{var} is not in config.env"));
    humantime::parse_duration(raw).unwrap_or_else(|e| panic!("{var}={raw}: {e}"))
}

/// Every pod template: name and template.
fn workloads(objects: &[Value]) -> impl Iterator<Item = (&str, &Value)> {
    objects
        .iter()
        .filter(|o| ["Deployment", "Job", "StatefulSet"].contains(&text(&o["kind"])))
        .map(|o| (text(&o["metadata"]["name"]), &o["spec"]["template"]))
}

/// The pod templates running the flashmesh image (not the data stores).
fn flashmesh_workloads(objects: &[Value]) -> impl Iterator<Item = (&str, &Value)> {
    workloads(objects)
        .filter(|(_, pod)| pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "flashmesh")
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    list(&pod["spec"]["containers"])
        .iter()
        .chain(list(&pod["spec"]["initContainers"]))
}

#[test]
fn overlays_render_and_every_object_validates_against_the_schemas() {
    let dir = tempfile::tempdir().expect("temp dir");
    for overlay in OVERLAYS {
        let (yaml, objects) = render(overlay);
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, yaml).expect("write the rendered overlay");
        let output = Command::new(tools().join("kubernetes-validate"))
            .arg("--strict")
            .arg("--quiet")
            .arg(&file)
            .arg(repo_root().join("k8s/secrets.example.yaml"))
            .output()
            .expect("run kubernetes-validate");
        assert!(
            output.status.success(),
            "{overlay} does not validate:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for service in SERVICES {
            for kind in [
                "Deployment",
                "Service",
                "ServiceAccount",
                "PodDisruptionBudget",
                "HorizontalPodAutoscaler",
            ] {
                named(&objects, kind, service);
            }
        }
        for (kind, name) in [
            ("Job", "migrate"),
            ("Ingress", "gateway"),
            ("NetworkPolicy", "default-deny"),
            ("Namespace", "flashmesh"),
        ] {
            named(&objects, kind, name);
        }
        let stateful: BTreeSet<_> = of_kind(&objects, "StatefulSet")
            .map(|o| text(&o["metadata"]["name"]))
            .collect();
        let expected: BTreeSet<_> = match *overlay {
            "dev" => ["postgres", "redis"].into(),
            _ => BTreeSet::new(),
        };
        assert_eq!(stateful, expected, "{overlay}: in-cluster data stores");
        for object in &objects {
            if object["kind"] != "Namespace" {
                assert_eq!(object["metadata"]["namespace"], "flashmesh", "{object:?}");
            }
        }
    }
}

#[test]
fn deployments_are_hardened_probed_and_drain_within_their_grace_period() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        let config = config_map(&objects);
        let drain = duration(&config, "FLASHMESH_SHUTDOWN_DRAIN_DELAY")
            + duration(&config, "FLASHMESH_SHUTDOWN_TIMEOUT");
        for (name, pod) in workloads(&objects) {
            let spec = &pod["spec"];
            let context = format!("{overlay}: {name}");
            let security = &spec["securityContext"];
            assert_eq!(security["runAsNonRoot"], true, "{context}");
            assert!(number(&security["runAsUser"]) > 0, "{context}");
            assert_eq!(
                security["seccompProfile"]["type"], "RuntimeDefault",
                "{context}"
            );
            assert_eq!(spec["automountServiceAccountToken"], false, "{context}");
            for container in containers(pod) {
                let context = format!("{context}/{}", text(&container["name"]));
                let security = &container["securityContext"];
                assert_eq!(security["readOnlyRootFilesystem"], true, "{context}");
                assert_eq!(security["allowPrivilegeEscalation"], false, "{context}");
                assert_eq!(
                    list(&security["capabilities"]["drop"]),
                    [Value::from("ALL")],
                    "{context}"
                );
                for bound in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            !container["resources"][bound][resource].is_null(),
                            "{context}: no {bound}.{resource}"
                        );
                    }
                }
            }
        }
        for service in SERVICES {
            let deployment = named(&objects, "Deployment", service);
            let pod = &deployment["spec"]["template"];
            let spec = &pod["spec"];
            let context = format!("{overlay}: {service}");
            let container = &spec["containers"][0];
            assert_eq!(container["args"][0], *service, "{context}");

            // Probes: native gRPC health on the port the service listens
            // on; the gateway's HTTP endpoints.
            let port = &container["ports"][0]["containerPort"];
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let probe_spec = &container[probe];
                match BACKENDS.iter().find(|(name, ..)| name == service) {
                    Some((_, addr_var, listen)) => {
                        assert_eq!(probe_spec["grpc"]["port"], *port, "{context} {probe}");
                        assert_eq!(number(port), *listen, "{context}");
                        let addr = &config[*addr_var];
                        assert!(addr.ends_with(&format!(":{listen}")), "{addr_var}={addr}");
                    }
                    None => {
                        let path = text(&probe_spec["httpGet"]["path"]);
                        let expected = if probe == "readinessProbe" {
                            "/readyz"
                        } else {
                            "/healthz"
                        };
                        assert_eq!(path, expected, "{context} {probe}");
                    }
                }
            }

            // Termination: the preStop sleep, then the drain delay and the
            // shutdown timeout, all inside the grace period.
            let pre_stop = number(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
            let grace = number(&spec["terminationGracePeriodSeconds"]);
            assert!(
                Duration::from_secs(pre_stop) + drain < Duration::from_secs(grace),
                "{context}: preStop {pre_stop}s + drain {drain:?} must end before the \
                 {grace}s grace period"
            );

            assert!(
                !list(&spec["topologySpreadConstraints"]).is_empty(),
                "{context}: no topology spread"
            );
            let account = named(
                &objects,
                "ServiceAccount",
                text(&spec["serviceAccountName"]),
            );
            assert_eq!(account["automountServiceAccountToken"], false, "{context}");
            let labels = &pod["metadata"]["labels"];
            assert!(
                of_kind(&objects, "PodDisruptionBudget")
                    .any(|pdb| selects(&pdb["spec"]["selector"], labels)),
                "{context}: no PodDisruptionBudget"
            );
            let hpa = named(&objects, "HorizontalPodAutoscaler", service);
            assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], *service);
            assert!(
                deployment["spec"]["replicas"].is_null(),
                "{context}: the HPA owns the replica count; an applied one resets it"
            );
            assert!(
                number(&hpa["spec"]["minReplicas"]) <= number(&hpa["spec"]["maxReplicas"]),
                "{context}"
            );
        }
    }
}

/// `--flag value` from a container's args.
fn flag<'a>(args: &'a [Value], name: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).map(text)
}

#[test]
fn the_order_pods_token_is_minted_first_and_renewed_before_it_expires() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        let config = config_map(&objects);
        let token_file = Path::new(&config["FLASHMESH_ORDER_TOKEN_FILE"]);
        let spec = &named(&objects, "Deployment", "order")["spec"]["template"]["spec"];
        let init = list(&spec["initContainers"]);
        let minters: Vec<_> = init
            .iter()
            .filter(|c| c["args"][0] == "token")
            .map(|c| {
                let args = list(&c["args"]);
                assert_eq!(flag(args, "--service"), Some("order"));
                assert_eq!(flag(args, "--output").map(Path::new), Some(token_file));
                let ttl = humantime::parse_duration(flag(args, "--ttl").expect("--ttl"))
                    .expect("a duration");
                let renew = flag(args, "--renew-every")
                    .map(|every| humantime::parse_duration(every).expect("a duration"));
                (c["restartPolicy"] == "Always", ttl, renew)
            })
            .collect();
        // A one-shot minter runs before the service starts; then a native
        // sidecar renews well before the token expires.
        assert!(
            matches!(minters[..], [(false, _, None), (true, ..)]),
            "{minters:?}"
        );
        let (_, ttl, renew) = minters[1];
        let renew = renew.expect("the sidecar renews");
        assert!(
            renew * 2 <= ttl,
            "renewing every {renew:?} a token of {ttl:?}"
        );
        let mounted = list(&spec["containers"][0]["volumeMounts"])
            .iter()
            .any(|m| token_file.starts_with(text(&m["mountPath"])));
        assert!(
            mounted,
            "{overlay}: the order container cannot see its token"
        );
    }
}

#[test]
fn grpc_backends_are_headless_and_the_upstream_urls_name_them() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        let config = config_map(&objects);
        for (service, _, port) in BACKENDS {
            let svc = named(&objects, "Service", service);
            assert_eq!(
                svc["spec"]["clusterIP"], "None",
                "{overlay}: {service} must be headless so clients see every pod"
            );
            assert_eq!(number(&svc["spec"]["ports"][0]["port"]), *port);
        }
        assert!(named(&objects, "Service", "gateway")["spec"]["clusterIP"].is_null());
        // Every upstream URL is `http://<a headless Service>:<its port>`.
        for var in [
            "FLASHMESH_AUTH_URL",
            "FLASHMESH_CATALOG_URL",
            "FLASHMESH_ORDER_URL",
        ] {
            for url in config[var].split(',') {
                let url = url::Url::parse(url.trim()).unwrap_or_else(|e| panic!("{var}: {e}"));
                let host = url.host_str().expect("a host");
                let svc = named(&objects, "Service", host);
                assert_eq!(svc["spec"]["clusterIP"], "None", "{var}");
                assert_eq!(
                    url.port().map(u64::from),
                    svc["spec"]["ports"][0]["port"].as_u64(),
                    "{var}"
                );
            }
        }
        // The Ingress reaches the gateway's Service port.
        let backend = &named(&objects, "Ingress", "gateway")["spec"]["rules"][0]["http"]["paths"]
            [0]["backend"]["service"];
        assert_eq!(backend["name"], "gateway");
        let gateway = named(&objects, "Service", "gateway");
        assert!(
            list(&gateway["spec"]["ports"])
                .iter()
                .any(|p| p["name"] == backend["port"]["name"]),
            "the Ingress names a port the gateway Service lacks"
        );
    }
}

#[test]
fn network_policies_deny_by_default_and_admit_only_the_ingress_and_each_other() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        let deny = named(&objects, "NetworkPolicy", "default-deny");
        assert_eq!(
            deny["spec"]["podSelector"],
            Value::Mapping(Default::default())
        );
        assert_eq!(
            list(&deny["spec"]["policyTypes"]),
            [Value::from("Ingress"), Value::from("Egress")]
        );
        assert!(deny["spec"]["ingress"].is_null() && deny["spec"]["egress"].is_null());

        let pod_labels = |name: &str| {
            named(&objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"].clone()
        };
        // Who may open connections to `pod`: every `from` peer of every
        // policy that selects it.
        let peers = |labels: &Value| -> Vec<Value> {
            of_kind(&objects, "NetworkPolicy")
                .filter(|p| selects(&p["spec"]["podSelector"], labels))
                .flat_map(|p| list(&p["spec"]["ingress"]))
                .filter(|rule| !is_metrics_scrape(rule))
                .flat_map(|rule| {
                    assert!(!rule["from"].is_null(), "an ingress rule without `from`");
                    list(&rule["from"]).to_vec()
                })
                .collect()
        };
        // The one exception: Prometheus, from its namespace, to the admin
        // port only.
        let scrapes: Vec<&Value> = of_kind(&objects, "NetworkPolicy")
            .flat_map(|p| list(&p["spec"]["ingress"]))
            .filter(|rule| is_metrics_scrape(rule))
            .collect();
        assert_eq!(scrapes.len(), 1, "{overlay}: one metrics scrape rule");
        for peer in list(&scrapes[0]["from"]) {
            assert_eq!(
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                "monitoring",
                "{overlay}: metrics scraped by {peer:?}"
            );
        }
        let gateway_peers = peers(&pod_labels("gateway"));
        assert!(
            !gateway_peers.is_empty(),
            "{overlay}: the gateway is unreachable"
        );
        for peer in &gateway_peers {
            assert!(
                peer["podSelector"].is_null() && peer["ipBlock"].is_null(),
                "{overlay}: the gateway admits {peer:?}"
            );
            assert_eq!(
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                "ingress-nginx"
            );
        }
        for (service, ..) in BACKENDS {
            let admitted = peers(&pod_labels(service));
            assert!(!admitted.is_empty(), "{overlay}: {service} is unreachable");
            for peer in &admitted {
                // Same namespace only (no namespaceSelector, no ipBlock),
                // and only flashmesh services.
                assert!(
                    peer["namespaceSelector"].is_null() && peer["ipBlock"].is_null(),
                    "{overlay}: {service} admits {peer:?}"
                );
                let admits_a_service = SERVICES
                    .iter()
                    .any(|other| selects(&peer["podSelector"], &pod_labels(other)));
                assert!(admits_a_service, "{overlay}: {service} admits {peer:?}");
            }
        }
    }
}

/// What a pod may connect to, by (protocol, port): the union of the `to`
/// rules of every egress policy selecting it, with their peers.
fn egress(objects: &[Value], labels: &Value) -> Vec<(String, u64, Vec<Value>)> {
    of_kind(objects, "NetworkPolicy")
        .filter(|p| selects(&p["spec"]["podSelector"], labels))
        .flat_map(|p| list(&p["spec"]["egress"]))
        .flat_map(|rule| {
            list(&rule["ports"]).iter().map(|port| {
                (
                    port["protocol"].as_str().unwrap_or("TCP").to_owned(),
                    number(&port["port"]),
                    list(&rule["to"]).to_vec(),
                )
            })
        })
        .collect()
}

#[test]
fn every_flashmesh_pod_may_reach_dns_and_the_data_stores_and_clients_their_upstreams() {
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        for (name, pod) in flashmesh_workloads(&objects) {
            let allowed = egress(&objects, &pod["metadata"]["labels"]);
            let allows = |protocol: &str, port: u64| {
                allowed.iter().any(|(p, n, _)| p == protocol && *n == port)
            };
            for (protocol, port) in [("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 6379)] {
                assert!(
                    allows(protocol, port),
                    "{overlay}: {name} cannot reach {protocol}/{port}"
                );
            }
            // DNS only to the cluster's resolver.
            for (_, _, to) in allowed.iter().filter(|(_, port, _)| *port == 53) {
                assert!(!to.is_empty(), "{overlay}: {name} may ask any DNS server");
            }
        }
        // Callers reach the gRPC ports of the services they call.
        for (caller, callees) in [
            ("gateway", &["auth", "catalog", "order"][..]),
            ("order", &["auth", "catalog"]),
            ("catalog", &["auth"]),
        ] {
            let labels =
                &named(&objects, "Deployment", caller)["spec"]["template"]["metadata"]["labels"];
            let allowed = egress(&objects, labels);
            for callee in callees {
                let (.., port) = BACKENDS
                    .iter()
                    .find(|(name, ..)| name == callee)
                    .expect("a backend");
                let callee_labels = &named(&objects, "Deployment", callee)["spec"]["template"]["metadata"]
                    ["labels"];
                let reachable = allowed.iter().any(|(protocol, n, to)| {
                    protocol == "TCP"
                        && n == port
                        && (to.is_empty()
                            || to
                                .iter()
                                .any(|peer| selects(&peer["podSelector"], callee_labels)))
                });
                assert!(reachable, "{overlay}: {caller} cannot call {callee}");
            }
        }
    }
}

/// Every variable each workload's containers get: `env` names, and the
/// keys of the ConfigMaps and Secrets they take whole with `envFrom`.
fn deployed_variables(objects: &[Value], secrets: &[Value]) -> BTreeSet<String> {
    let mut variables = BTreeSet::new();
    for (workload, pod) in flashmesh_workloads(objects) {
        for container in containers(pod) {
            for var in list(&container["env"]) {
                variables.insert(text(&var["name"]).to_owned());
                let secret = &var["valueFrom"]["secretKeyRef"];
                if !secret.is_null() {
                    let source = named(secrets, "Secret", text(&secret["name"]));
                    assert!(
                        !source["stringData"][text(&secret["key"])].is_null(),
                        "{workload}: the example Secret lacks {secret:?}"
                    );
                }
            }
            for source in list(&container["envFrom"]) {
                let (kind, field, from) = if source["configMapRef"].is_null() {
                    ("Secret", "stringData", secrets)
                } else {
                    ("ConfigMap", "data", objects)
                };
                let reference = if kind == "Secret" {
                    &source["secretRef"]
                } else {
                    &source["configMapRef"]
                };
                let object = named(from, kind, text(&reference["name"]));
                variables.extend(keys(&object[field]));
            }
        }
    }
    variables
}

#[test]
fn kubernetes_sets_every_knob_the_code_reads_and_nothing_else() {
    let read = configuration_variables();
    assert!(read.len() > 50, "the source scan found only {read:?}");
    let secrets = example_secrets();
    for overlay in OVERLAYS {
        let (_, objects) = render(overlay);
        let deployed = deployed_variables(&objects, &secrets);
        let missing: Vec<_> = read.difference(&deployed).collect();
        assert!(
            missing.is_empty(),
            "{overlay}: read by the code, set nowhere in the manifests: {missing:?}"
        );
        let unknown: Vec<_> = deployed.difference(&read).collect();
        assert!(
            unknown.is_empty(),
            "{overlay}: set in the manifests, read by no code: {unknown:?}"
        );
    }
}

// ---- docker-compose.yml ------------------------------------------------

/// The compose file with `<<` merges applied, after a typed parse (which
/// refuses unknown keys and undeclared volumes).
fn compose() -> Value {
    let yaml = std::fs::read_to_string(repo_root().join("docker-compose.yml"))
        .expect("docker-compose.yml");
    let typed = compose_spec::Compose::options()
        .apply_merge(true)
        .from_yaml_str(&yaml)
        .unwrap_or_else(|e| panic!("docker-compose.yml is not a compose file: {e}"));
    typed
        .validate_all()
        .unwrap_or_else(|e| panic!("docker-compose.yml: {e}"));
    let mut value: Value = serde_yaml::from_str(&yaml).expect("YAML");
    value.apply_merge().expect("merge keys");
    value
}

fn compose_services(compose: &Value) -> Vec<(String, &Value)> {
    keys(&compose["services"])
        .map(|name| {
            let service = &compose["services"][name.as_str()];
            (name, service)
        })
        .collect()
}

fn is_flashmesh(service: &Value) -> bool {
    service["image"]
        .as_str()
        .is_some_and(|image| image.starts_with("flashmesh:"))
}

/// `KEY=VALUE` lines of an env file.
fn env_file_keys(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, _) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: {line:?} is not KEY=VALUE", path.display()));
            key.to_owned()
        })
        .collect()
}

#[test]
fn compose_services_are_health_checked_and_start_in_order() {
    let compose = compose();
    let services = compose_services(&compose);
    let names: BTreeSet<_> = services.iter().map(|(name, _)| name.as_str()).collect();
    for wanted in [
        "postgres",
        "redis",
        "migrate",
        "auth",
        "catalog",
        "order",
        "gateway",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(wanted), "docker-compose.yml has no {wanted}");
    }
    let one_shot = |service: &Value| service["restart"] == "no";
    for (name, service) in &services {
        let check = &service["healthcheck"]["test"];
        if one_shot(service) {
            assert!(check.is_null(), "{name} runs once; nothing to health-check");
        } else if let Some((_, why)) = NO_HEALTHCHECK.iter().find(|(n, _)| n == name) {
            assert!(check.is_null(), "{name} is listed without a check ({why})");
        } else {
            assert_eq!(check[0], "CMD", "{name}: an exec check, no shell");
        }
        if is_flashmesh(service) && !one_shot(service) {
            assert_eq!(
                list(check)[..3],
                [
                    Value::from("CMD"),
                    Value::from("/flashmesh"),
                    Value::from("health")
                ],
                "{name}"
            );
            assert_eq!(service["read_only"], true, "{name}");
            assert_eq!(list(&service["cap_drop"]), [Value::from("ALL")], "{name}");
        }
        let depends_on = &service["depends_on"];
        assert!(
            depends_on.is_null() || depends_on.is_mapping(),
            "{name}: depends_on needs the long form, with conditions"
        );
        for dependency in keys(depends_on) {
            let target = &compose["services"][dependency.as_str()];
            assert!(!target.is_null(), "{name} depends on unknown {dependency}");
            let expected = if one_shot(target) {
                "service_completed_successfully"
            } else if NO_HEALTHCHECK.iter().any(|(n, _)| *n == dependency) {
                "service_started"
            } else {
                "service_healthy"
            };
            assert_eq!(
                depends_on[dependency.as_str()]["condition"],
                expected,
                "{name} → {dependency}"
            );
        }
    }
    // Migrations finish before any service starts.
    for service in ["auth", "catalog", "order"] {
        let waits = |s: &str| !compose["services"][s]["depends_on"]["migrate"].is_null();
        let after_token = !compose["services"][service]["depends_on"]["token"].is_null();
        assert!(
            waits(service) || (after_token && waits("token")),
            "{service} may start before the migrations"
        );
    }
}

#[test]
fn compose_mounts_exist_and_the_environment_covers_every_knob() {
    let compose = compose();
    let root = repo_root();
    let read = configuration_variables();
    for (name, service) in compose_services(&compose) {
        let mut files: Vec<String> = list(&service["env_file"])
            .iter()
            .map(|f| text(f).to_owned())
            .collect();
        for volume in list(&service["volumes"]) {
            let source = text(volume).split(':').next().unwrap_or_default();
            if source.starts_with('.') {
                files.push(source.trim_start_matches("./").to_owned());
            }
        }
        for file in &files {
            assert!(root.join(file).exists(), "{name} mounts missing {file}");
        }
        if !is_flashmesh(service) {
            continue;
        }
        let mut variables: BTreeSet<String> = files
            .iter()
            .filter(|f| f.ends_with(".env"))
            .flat_map(|f| env_file_keys(&root.join(f)))
            .collect();
        variables.extend(keys(&service["environment"]));
        let missing: Vec<_> = read.difference(&variables).collect();
        assert!(missing.is_empty(), "compose {name} lacks {missing:?}");
        let unknown: Vec<_> = variables.difference(&read).collect();
        assert!(
            unknown.is_empty(),
            "compose {name} sets {unknown:?}, which no code reads"
        );
    }
}

// ---- Dockerfile --------------------------------------------------------

#[test]
fn dockerfile_lints_clean_and_builds_one_non_root_distroless_image() {
    let output = Command::new(tools().join("hadolint"))
        .arg("Dockerfile")
        .current_dir(repo_root())
        .output()
        .expect("run hadolint");
    assert!(
        output.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let runtime = instructions
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    assert_eq!(
        instructions[runtime],
        "FROM gcr.io/distroless/cc-debian12:nonroot"
    );
    let runtime_stage = &instructions[runtime..];
    let user = runtime_stage
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the runtime stage");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a numeric user, so runAsNonRoot can verify it");
    assert_ne!(uid, 0);
    assert!(runtime_stage.contains(&r#"ENTRYPOINT ["/flashmesh"]"#));
    // Dependencies cached in a layer of their own, by a pinned cargo-chef.
    let position = |needle: &str| {
        instructions
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?}"))
    };
    assert!(
        instructions[position("cargo install cargo-chef")].contains("--version 0.1.")
            && instructions[position("cargo install cargo-chef")].contains("--locked")
    );
    assert!(position("cargo chef cook") < position("cargo build --release --locked"));
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    for excluded in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == excluded),
            ".dockerignore: {excluded}"
        );
    }
    // What `cargo build` reads stays in the context: the manifests, every
    // workspace member, the contracts (build.rs) and the migrations
    // (compiled in).
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("workspace members");
    let needed = members.split('"').skip(1).step_by(2).chain([
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "proto",
        "migrations",
    ]);
    for path in needed {
        let top = path.split('/').next().unwrap_or(path);
        let dropped = ignore
            .lines()
            .map(|l| l.trim_end_matches('/'))
            .any(|l| l == path || l == top);
        assert!(
            !dropped,
            ".dockerignore drops {path}, which the build needs"
        );
    }
}

// ---- What the manifests rely on ----------------------------------------

/// A channel to `addr` that counts the TCP connections it opens.
async fn counting_channel(
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
) -> tonic::transport::Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connections = connections.clone();
            async move {
                connections.fetch_add(1, Ordering::SeqCst);
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            }
        }))
        .await
        .expect("connect")
}

#[tokio::test]
async fn max_connection_age_moves_clients_to_new_connections() {
    for (age, reconnects) in [("1s", true), ("5m", false)] {
        let mut env = StackEnv::new(Backend::Embedded).await;
        env.set("FLASHMESH_MAX_CONNECTION_AGE", age);
        let auth = env.start_auth().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let mut health = HealthClient::new(counting_channel(auth.addr, connections.clone()).await);
        for _ in 0..30 {
            health
                .check(HealthCheckRequest::default())
                .await
                .expect("calls succeed across the server's GOAWAY");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let opened = connections.load(Ordering::SeqCst);
        if reconnects {
            assert!(
                opened >= 2,
                "age {age}: one connection served 3 s of calls ({opened} opened)"
            );
        } else {
            assert_eq!(opened, 1, "age {age}");
        }
        auth.stop().await;
    }
}

/// `flashmesh health <args>`: exit code, stdout + stderr, how long it took.
/// A broken configuration in the environment must not matter to it.
async fn health_command(args: &[&str]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = tokio::process::Command::new(BINARY)
        .arg("health")
        .args(args)
        .env("FLASHMESH_REQUEST_TIMEOUT", "not a duration")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run flashmesh health");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text, started.elapsed())
}

#[tokio::test]
async fn health_command_tells_serving_from_draining_and_unreachable() {
    let mut env = StackEnv::new(Backend::Embedded).await;
    env.set("FLASHMESH_SHUTDOWN_DRAIN_DELAY", "10s");
    let stack = env.start_orders().await;
    let gateway = env.start_gateway(&stack).await;
    let auth = &stack.catalog.auth;
    let auth_addr = auth.addr.to_string();

    let (code, output, _) = health_command(&[&auth_addr]).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("SERVING"), "{output}");
    let order = stack.order.running.endpoint();
    let (code, output, _) =
        health_command(&[&order, "--service", "flashmesh.order.v1.OrderService"]).await;
    assert_eq!(code, Some(0), "{output}");
    let (code, output, _) =
        health_command(&[&auth_addr, "--service", "flashmesh.nope.v1.Nope"]).await;
    assert_eq!(code, Some(1), "an unknown service: {output}");

    // The gateway over HTTP: 2xx is healthy, anything else is not.
    for (path, expected, said) in [
        ("/healthz", 0, "200 OK"),
        ("/readyz", 0, "200 OK"),
        ("/no-such-page", 1, "404 Not Found"),
    ] {
        let (code, output, _) = health_command(&[&gateway.url(path)]).await;
        assert_eq!(code, Some(expected), "{path}: {output}");
        assert!(output.contains(said), "{path}: {output}");
    }

    // Nothing listening: refused at once.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let (code, output, took) = health_command(&[&closed]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Accepted but never answered: the timeout ends it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let (code, output, took) = health_command(&[&silent_addr, "--timeout", "500ms"]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(silent);

    // Draining after SIGTERM: NOT_SERVING, so the container is unhealthy.
    auth.shutdown.cancel();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, output, _) = health_command(&[&auth_addr]).await;
        if code == Some(1) {
            assert!(output.contains("NOT_SERVING"), "{output}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {code:?} while draining: {output}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn token_command_writes_a_private_file() {
    let env = StackEnv::new(Backend::Embedded).await;
    let file = env.data_dir.path().join("tokens").join("order.token");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    // A previous token, readable by all, is replaced whole.
    std::fs::write(&file, "old").expect("write");
    let output = tokio::process::Command::new(BINARY)
        .args(["token", "--service", "order", "--ttl", "10m", "--output"])
        .arg(&file)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .envs(env.vars())
        .output()
        .await
        .expect("run flashmesh token");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty(), "the token is not printed");
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(&file).expect("token file");
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).expect("read");
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let claims = token.split('.').nth(1).expect("claims");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
            .expect("base64url claims"),
    )
    .expect("JSON claims");
    assert_eq!(claims["sub"], "order");
    assert_eq!(claims["role"], "service");
    let leftovers: Vec<_> = std::fs::read_dir(file.parent().expect("parent"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, ["order.token"], "no temporary file left");
}

/// Behind the Ingress every connection comes from the ingress controller:
/// the per-IP limit must count the client it forwards for, and only when the
/// connection comes from a trusted proxy.
#[tokio::test]
async fn per_ip_limits_see_the_client_behind_a_trusted_proxy() {
    for (trusted, per_client) in [("127.0.0.0/8", true), ("", false)] {
        let mut env = StackEnv::new(Backend::Embedded).await;
        env.set("FLASHMESH_RATE_LIMIT_IP", "1/s:3");
        env.set("FLASHMESH_GATEWAY_TRUSTED_PROXIES", trusted);
        let stack = env.start_orders().await;
        let gateway = env.start_gateway(&stack).await;
        let http = reqwest::Client::new();
        let get = |client: &'static str| {
            http.get(gateway.url("/v1/deals"))
                .header("x-forwarded-for", format!("198.51.100.7, {client}"))
                .send()
        };
        for _ in 0..3 {
            assert_eq!(get("203.0.113.1").await.expect("GET").status(), 200);
        }
        assert_eq!(get("203.0.113.1").await.expect("GET").status(), 429);
        let other = get("203.0.113.2").await.expect("GET").status();
        let expected = if per_client { 200 } else { 429 };
        assert_eq!(other, expected, "trusted proxies {trusted:?}");
    }
}

/// The order pod's sidecar: a fresh token every period, until SIGTERM.
#[tokio::test]
async fn token_command_renews_the_file_until_terminated() {
    let env = StackEnv::new(Backend::Embedded).await;
    let file = env.data_dir.path().join("order.token");
    let token = |args: &[&str]| {
        let mut command = tokio::process::Command::new(BINARY);
        command
            .args(["token", "--service", "order", "--output"])
            .arg(&file)
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "warn")
            .envs(env.vars())
            .kill_on_drop(true);
        command
    };
    let refused = token(&["--ttl", "1m", "--renew-every", "1m"])
        .output()
        .await
        .expect("run");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--renew-every"));

    let mut renewer = token(&["--ttl", "10m", "--renew-every", "200ms"])
        .spawn()
        .expect("spawn");
    let read = || std::fs::read_to_string(&file).ok();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(first) = read() {
            break first;
        }
        assert!(Instant::now() < deadline, "no token written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while read().as_ref() == Some(&first) {
        assert!(Instant::now() < deadline, "the token was not renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = renewer.id().expect("running").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await;
    assert!(killed.expect("kill").success());
    let status = tokio::time::timeout(Duration::from_secs(5), renewer.wait())
        .await
        .expect("stops soon after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
}

/// An ingress rule admitting only the metrics port (`FLASHMESH_METRICS_ADDR`).
fn is_metrics_scrape(rule: &Value) -> bool {
    let ports = rule["ports"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default();
    !ports.is_empty() && ports.iter().all(|p| p["port"] == 9464)
}
