// Apache HttpClient 4.5 keep-alive client for scripts/bench/run.sh (the
// `clients` scenario); see README.md here for the protocol.
//
//   java -cp OUT:httpclient.jar:httpcore.jar:commons-logging.jar:commons-codec.jar \
//     HttpClientBench URL WORKERS MAX_GAP_MS DEADLINE_S
//
// Pooled (one PoolingHttpClientConnectionManager for every worker), no
// retries (DefaultHttpRequestRetryHandler(0, false)), no stale-connection
// check (validateAfterInactivity -1): a connection the server closed while
// it sat in the pool fails the next request sent on it.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.http.client.config.RequestConfig;
import org.apache.http.client.methods.CloseableHttpResponse;
import org.apache.http.client.methods.HttpGet;
import org.apache.http.client.methods.HttpPost;
import org.apache.http.client.methods.HttpUriRequest;
import org.apache.http.entity.ByteArrayEntity;
import org.apache.http.impl.client.CloseableHttpClient;
import org.apache.http.impl.client.DefaultHttpRequestRetryHandler;
import org.apache.http.impl.client.HttpClients;
import org.apache.http.impl.conn.PoolingHttpClientConnectionManager;
import org.apache.http.util.EntityUtils;

public class HttpClientBench {
    static final AtomicBoolean stop = new AtomicBoolean(false);
    static final AtomicLong ok = new AtomicLong();
    static final AtomicLong errors = new AtomicLong();
    static final Map<String, Long> kinds = new TreeMap<>();
    static final List<String> samples = new ArrayList<>();

    static synchronized void error(String kind, String msg) {
        errors.incrementAndGet();
        kinds.merge(kind, 1L, Long::sum);
        if (samples.size() < 10) samples.add(msg);
    }

    static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        int workers = Integer.parseInt(args[1]);
        int maxGap = Integer.parseInt(args[2]);
        long deadline = System.currentTimeMillis() + Long.parseLong(args[3]) * 1000;

        PoolingHttpClientConnectionManager cm = new PoolingHttpClientConnectionManager();
        cm.setMaxTotal(workers);
        cm.setDefaultMaxPerRoute(workers);
        cm.setValidateAfterInactivity(-1);
        RequestConfig rc = RequestConfig.custom()
            .setConnectTimeout(5000).setSocketTimeout(5000).setConnectionRequestTimeout(5000).build();
        CloseableHttpClient client = HttpClients.custom()
            .setConnectionManager(cm)
            .setRetryHandler(new DefaultHttpRequestRetryHandler(0, false))
            .setDefaultRequestConfig(rc)
            .build();

        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < workers; i++) {
            Thread t = new Thread(() -> {
                while (!stop.get() && System.currentTimeMillis() < deadline) {
                    try (CloseableHttpResponse r = client.execute(request(url))) {
                        int status = r.getStatusLine().getStatusCode();
                        EntityUtils.consume(r.getEntity());
                        if (status == 200) ok.incrementAndGet();
                        else error("status " + status, "status " + status);
                    } catch (Exception e) {
                        error(e.getClass().getSimpleName(), e.toString());
                    }
                    try {
                        Thread.sleep(ThreadLocalRandom.current().nextInt(maxGap + 1));
                    } catch (InterruptedException e) {
                        return;
                    }
                }
            });
            t.start();
            threads.add(t);
        }

        Thread stdin = new Thread(() -> {
            try (BufferedReader in = new BufferedReader(new InputStreamReader(System.in))) {
                String line;
                while ((line = in.readLine()) != null) {
                    if (line.contains("stop")) break;
                }
            } catch (Exception e) {
                // stdin closed: stop too
            }
            stop.set(true);
        });
        stdin.setDaemon(true);
        stdin.start();

        while (!stop.get() && System.currentTimeMillis() < deadline) {
            Thread.sleep(1000);
            System.err.println("progress " + ok.get() + " " + errors.get());
        }
        stop.set(true);
        for (Thread t : threads) t.join(10000);
        client.close();

        StringBuilder out = new StringBuilder();
        out.append("{\"client\":\"java-httpclient\",\"ok\":").append(ok.get())
           .append(",\"errors\":").append(errors.get()).append(",\"kinds\":{");
        synchronized (HttpClientBench.class) {
            boolean first = true;
            for (Map.Entry<String, Long> e : kinds.entrySet()) {
                if (!first) out.append(',');
                first = false;
                out.append(quote(e.getKey())).append(':').append(e.getValue());
            }
            out.append("},\"samples\":[");
            for (int i = 0; i < samples.size(); i++) {
                if (i > 0) out.append(',');
                out.append(quote(samples.get(i)));
            }
        }
        out.append("]}");
        System.out.println(out);
        System.exit(0);
    }

    // CLIENT_METHOD=POST sends a small body with each request (the tests).
    static HttpUriRequest request(String url) {
        if ("POST".equals(System.getenv("CLIENT_METHOD"))) {
            HttpPost p = new HttpPost(url);
            p.setEntity(new ByteArrayEntity(new byte[1024]));
            return p;
        }
        return new HttpGet(url);
    }
}
