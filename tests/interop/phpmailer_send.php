<?php
/*
 * Send one message with PHPMailer the way WordPress's wp_mail() does (wp-includes/pluggable.php):
 * a PHPMailer in exception mode set to isMail(), the message filled in, then the
 * 'phpmailer_init' action, whose hooks switch it to SMTP, then send(). The hook is either
 * what WP Mail SMTP's "Other SMTP" mailer sets from its settings page, or a phpmailer_init
 * snippet file (docs/wordpress.md) run verbatim.
 *
 * Usage: php phpmailer_send.php JOB.json
 * Prints "SENT <last SMTP reply>" and exits 0, or "ERROR: <PHPMailer's message>" and exits 1.
 * PHPMailer's SMTP transcript (SMTPDebug = 2, as WP Mail SMTP's debug log shows it) goes to
 * stderr.
 */

declare(strict_types=1);

require '/usr/share/php/libphp-phpmailer/autoload.php';

use PHPMailer\PHPMailer\PHPMailer;
use PHPMailer\PHPMailer\Exception;

// The two WordPress plugin API functions a phpmailer_init snippet uses.
$GLOBALS['wp_filter'] = [];
function add_action(string $hook, callable $callback, int $priority = 10, int $accepted_args = 1): bool
{
    $GLOBALS['wp_filter'][$hook][] = $callback;
    return true;
}
function do_action_ref_array(string $hook, array $args): void
{
    foreach ($GLOBALS['wp_filter'][$hook] ?? [] as $callback) {
        call_user_func_array($callback, $args);
    }
}

// WP Mail SMTP, mailer "Other SMTP": its settings page fields applied as the plugin does.
function wp_mail_smtp_other_smtp(array $s): void
{
    add_action('phpmailer_init', function (PHPMailer $phpmailer) use ($s): void {
        $phpmailer->isSMTP();
        $phpmailer->Host = $s['host'];
        $phpmailer->Port = (int) $s['port'];
        // Encryption: "None" -> '', "SSL" -> 'ssl' (implicit TLS), "TLS" -> 'tls' (STARTTLS).
        $phpmailer->SMTPSecure = $s['encryption'] === 'none' ? '' : $s['encryption'];
        // "Auto TLS" (on by default): STARTTLS whenever the server offers it.
        $phpmailer->SMTPAutoTLS = (bool) $s['autotls'];
        $phpmailer->SMTPAuth = (bool) $s['auth'];
        if ($s['auth']) {
            $phpmailer->Username = $s['user'];
            $phpmailer->Password = $s['pass'];
        }
        if (!empty($s['authtype'])) {
            $phpmailer->AuthType = $s['authtype'];  // not on the page: phpmailer_init only
        }
    });
}

$job = json_decode(file_get_contents($argv[1]), true, 512, JSON_THROW_ON_ERROR);
foreach ($job['constants'] ?? [] as $name => $value) {
    define($name, $value);  // what wp-config.php would define()
}
if (isset($job['wp_mail_smtp'])) {
    wp_mail_smtp_other_smtp($job['wp_mail_smtp']);
}
if (isset($job['snippet'])) {
    require $job['snippet'];
}

$phpmailer = new PHPMailer(true);
$phpmailer->isMail();
$phpmailer->CharSet = 'UTF-8';
$phpmailer->setFrom($job['from'], $job['from_name'], false);
$phpmailer->addAddress($job['to']);
foreach ($job['bcc'] ?? [] as $bcc) {
    $phpmailer->addBCC($bcc);
}
$phpmailer->Subject = $job['subject'];
$phpmailer->Body = $job['body'];
$phpmailer->isHTML(false);
foreach ($job['attachments'] ?? [] as $path) {
    $phpmailer->addAttachment($path);
}
$phpmailer->SMTPDebug = 2;
$phpmailer->Debugoutput = function (string $line, int $level): void {
    fwrite(STDERR, rtrim($line) . "\n");
};
$phpmailer->Timeout = 20;

do_action_ref_array('phpmailer_init', [&$phpmailer]);
try {
    $phpmailer->send();
} catch (Exception $e) {
    echo 'ERROR: ' . $e->getMessage() . "\n";
    exit(1);
}
echo "SENT\n";
exit(0);
