// Readiness probe for scripts/kafka: polls both listeners (PLAINTEXT and mTLS) with a real
// Metadata request (AdminClient.listTopics) until both answer or the deadline passes.
// Usage: KafkaProbe <plaintext host:port[,...]> <ssl host:port[,...]> <tls dir> <timeout seconds> [node ids]
// Comma-separated lists (a cluster's nodes) are checked one address at a time, each on its own,
// so every node has to answer. With [node ids] (comma-separated), the cluster must also report
// each of those nodes as a live broker (Admin.describeCluster).
// Exit 0 when all answered, 1 on timeout (printing the last error of each listener).
import java.util.Properties;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterOptions;
import org.apache.kafka.clients.admin.ListTopicsOptions;
import org.apache.kafka.common.Node;

public class KafkaProbe {
    static Properties base(String bootstrap) {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        props.put("reconnect.backoff.max.ms", "500");
        return props;
    }

    static String check(Properties props) {
        try (Admin admin = Admin.create(props)) {
            admin.listTopics(new ListTopicsOptions().timeoutMs(3000)).names().get(4, TimeUnit.SECONDS);
            return null;
        } catch (Exception e) {
            Throwable c = e.getCause() != null ? e.getCause() : e;
            return c.getClass().getSimpleName() + ": " + c.getMessage();
        }
    }

    /** The ids of the live brokers the cluster reports, or null when it could not be asked. */
    static Set<Integer> brokers(String bootstrap) {
        try (Admin admin = Admin.create(base(bootstrap))) {
            Set<Integer> ids = new TreeSet<>();
            for (Node n : admin.describeCluster(new DescribeClusterOptions().timeoutMs(3000)).nodes().get(4, TimeUnit.SECONDS)) {
                ids.add(n.id());
            }
            return ids;
        } catch (Exception e) {
            return null;
        }
    }

    static Properties ssl(String bootstrap, String tls) {
        Properties s = base(bootstrap);
        s.put("security.protocol", "SSL");
        s.put("ssl.truststore.type", "PEM");
        s.put("ssl.truststore.location", tls + "/ca.pem");
        s.put("ssl.keystore.type", "PEM");
        s.put("ssl.keystore.location", tls + "/client-keystore.pem");
        return s;
    }

    public static void main(String[] args) throws Exception {
        String[] plain = args[0].split(","), sslAddr = args[1].split(",");
        String tls = args[2];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[3]));
        Set<Integer> want = new TreeSet<>();
        if (args.length > 4) for (String id : args[4].split(",")) want.add(Integer.parseInt(id.trim()));
        String[] plainErr = new String[plain.length], sslErr = new String[plain.length];
        java.util.Arrays.fill(plainErr, "not tried");
        java.util.Arrays.fill(sslErr, "not tried");
        Set<Integer> seen = null;
        while (System.nanoTime() < deadline) {
            boolean all = true;
            for (int i = 0; i < plain.length; i++) {
                if (plainErr[i] == null && sslErr[i] == null) continue; // answered already
                plainErr[i] = check(base(plain[i]));
                if (plainErr[i] == null) sslErr[i] = check(ssl(sslAddr[i], tls));
                all &= plainErr[i] == null && sslErr[i] == null;
            }
            if (all && !want.isEmpty()) {
                seen = brokers(args[0]);
                all = seen != null && seen.containsAll(want);
            }
            if (all) {
                System.out.println("metadata OK on " + args[0] + " (PLAINTEXT) and " + args[1] + " (SSL, mTLS)"
                        + (want.isEmpty() ? "" : "; live brokers " + seen));
                return;
            }
            Thread.sleep(300);
        }
        StringBuilder msg = new StringBuilder("broker not ready:");
        for (int i = 0; i < plain.length; i++) {
            msg.append(i > 0 ? ";" : "").append(" PLAINTEXT ").append(plain[i]).append(": ")
               .append(plainErr[i] == null ? "ok" : plainErr[i])
               .append("; SSL ").append(sslAddr[i]).append(": ").append(sslErr[i] == null ? "ok" : sslErr[i]);
        }
        if (!want.isEmpty()) msg.append("; live brokers ").append(seen == null ? "unknown" : seen).append(", wanted ").append(want);
        System.err.println(msg);
        System.exit(1);
    }
}
