// Send one message with nodemailer's SMTP transport; the job (transport options and message)
// is a JSON file named on the command line, so the test states exactly what a user would write.
//
// Usage: node send.mjs JOB.json
// Prints "SENT <server reply>" and exits 0, or "ERROR <code>: <message>" and exits 1.
import { readFileSync } from "node:fs";
import nodemailer from "nodemailer";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const transporter = nodemailer.createTransport(job.transport);
try {
  const info = await transporter.sendMail(job.message);
  console.log(`SENT ${info.response}`);
  process.exit(0);
} catch (err) {
  console.log(`ERROR ${err.code}: ${err.message}`);
  process.exit(1);
}
