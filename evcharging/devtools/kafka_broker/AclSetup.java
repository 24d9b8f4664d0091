// Creates Kafka ACLs through the Admin API, in one JVM (evcharging.devtools.kafka_broker.sasl).
//
// Run with java's single-file source launcher and the broker's jars on the classpath:
//   EVCHARGING_KAFKA_ADMIN_PASSWORD=... java -cp 'libs/*' AclSetup.java BOOTSTRAP < acls.tsv
// Each line of stdin is one ALLOW binding for any host:
//   principal <TAB> resourceType <TAB> patternType <TAB> resourceName <TAB> operation
// It connects as the super user `admin` (SASL_PLAINTEXT, SCRAM-SHA-512), creates the bindings
// (creating one that exists is a no-op) and returns once the broker's authorizer lists them all.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class AclSetup {
    public static void main(String[] args) throws Exception {
        String password = System.getenv("EVCHARGING_KAFKA_ADMIN_PASSWORD");
        if (args.length != 1 || password == null) {
            System.err.println("usage: EVCHARGING_KAFKA_ADMIN_PASSWORD=... AclSetup BOOTSTRAP < acls.tsv");
            System.exit(2);
        }
        List<AclBinding> acls = new ArrayList<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            if (line.isBlank()) {
                continue;
            }
            String[] f = line.split("\t", -1);
            ResourcePattern pattern = new ResourcePattern(
                ResourceType.fromString(f[1]), f[3], PatternType.fromString(f[2]));
            AccessControlEntry entry = new AccessControlEntry(
                "User:" + f[0], "*", AclOperation.fromString(f[4]), AclPermissionType.ALLOW);
            acls.add(new AclBinding(pattern, entry));
        }
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("client.id", "evcharging-acl-setup");
        props.put("security.protocol", "SASL_PLAINTEXT");
        props.put("sasl.mechanism", "SCRAM-SHA-512");
        props.put("sasl.jaas.config", "org.apache.kafka.common.security.scram.ScramLoginModule "
            + "required username=\"admin\" password=\"" + password + "\";");
        props.put("default.api.timeout.ms", "60000");
        try (Admin admin = Admin.create(props)) {
            admin.createAcls(acls).all().get();
            Set<AclBinding> wanted = new HashSet<>(acls);
            long deadline = System.nanoTime() + 60_000_000_000L;
            while (true) {
                Set<AclBinding> listed = new HashSet<>(admin.describeAcls(AclBindingFilter.ANY).values().get());
                if (listed.containsAll(wanted)) {
                    break;
                }
                if (System.nanoTime() > deadline) {
                    System.err.println("the broker did not list the new ACLs within 60 s");
                    System.exit(1);
                }
                Thread.sleep(50);
            }
        }
        System.out.println(acls.size() + " ACL bindings in place");
    }
}
