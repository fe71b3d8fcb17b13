// Readiness probe for scripts/kafka: polls both listeners (PLAINTEXT and mTLS) with a real
// Metadata request (AdminClient.listTopics) until both answer or the deadline passes.
// Usage: KafkaProbe <plaintext host:port> <ssl host:port> <tls dir> <timeout seconds>
// Exit 0 when both answered, 1 on timeout (printing the last error of each listener).
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListTopicsOptions;

public class KafkaProbe {
    static String check(Properties props) {
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        props.put("reconnect.backoff.max.ms", "500");
        try (Admin admin = Admin.create(props)) {
            admin.listTopics(new ListTopicsOptions().timeoutMs(3000)).names().get(4, TimeUnit.SECONDS);
            return null;
        } catch (Exception e) {
            Throwable c = e.getCause() != null ? e.getCause() : e;
            return c.getClass().getSimpleName() + ": " + c.getMessage();
        }
    }

    public static void main(String[] args) throws Exception {
        String plain = args[0], ssl = args[1], tls = args[2];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[3]));
        String plainErr = "not tried", sslErr = "not tried";
        while (System.nanoTime() < deadline) {
            Properties p = new Properties();
            p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, plain);
            plainErr = check(p);
            if (plainErr == null) {
                Properties s = new Properties();
                s.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, ssl);
                s.put("security.protocol", "SSL");
                s.put("ssl.truststore.type", "PEM");
                s.put("ssl.truststore.location", tls + "/ca.pem");
                s.put("ssl.keystore.type", "PEM");
                s.put("ssl.keystore.location", tls + "/client-keystore.pem");
                sslErr = check(s);
                if (sslErr == null) {
                    System.out.println("metadata OK on " + plain + " (PLAINTEXT) and " + ssl + " (SSL, mTLS)");
                    return;
                }
            }
            Thread.sleep(300);
        }
        System.err.println("broker not ready: PLAINTEXT " + plain + ": " + (plainErr == null ? "ok" : plainErr)
                + "; SSL " + ssl + ": " + sslErr);
        System.exit(1);
    }
}
