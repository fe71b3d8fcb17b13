/*
 * Deliberately empty. librdkafka 2.12's src/rdkafka_conf.c includes <curl/curl.h> under
 * `#ifdef WITH_OAUTHBEARER_OIDC`, and its CMake config.h always defines that macro (to 0 when
 * built without curl), so a build without curl fails on the missing header
 * (confluentinc/librdkafka#5135). Nothing of curl is used when WITH_CURL is off: every use is
 * under `#if WITH_OAUTHBEARER_OIDC` / `#if WITH_CURL`, so an empty header is enough, and any
 * code that did need curl would fail to compile against it rather than link something wrong.
 * Found through C_INCLUDE_PATH, set in .cargo/config.toml. Remove when librdkafka is fixed.
 */
