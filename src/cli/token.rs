//! `artiflight token`: bearer tokens for `serve --auth`, kept hashed in the catalog.

use anyhow::Result;
use artiflight_server::Server;
use artiflight_server::catalog::Role;
use artiflight_server::token::Token;
use clap::Subcommand;

use super::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Make a token; it is printed once, alone on the last line.
    Create {
        /// The token's name: the user name in basic auth.
        name: String,
        /// `read` lists, describes and reads; `write` also uploads, registers and deletes.
        #[arg(long, default_value = "read")]
        role: String,
    },
    /// List tokens by name and role (never the tokens themselves).
    List,
    /// Revoke a token; a running server refuses it within seconds.
    Revoke { name: String },
}

/// Tokens live in the catalog, so these commands always open it directly.
pub(crate) async fn run(global: &Global, command: TokenCommand) -> Result<()> {
    let server = Server::open(&global.options())?;
    let catalog = server.planner().catalog().clone();
    match command {
        TokenCommand::Create { name, role } => {
            let role: Role = role.parse()?;
            let token = Token::generate();
            let hash = token.hash();
            let record = catalog.create_token(&name, role, &hash).await?;
            eprintln!(
                "created token '{}' (role {}); it is shown once, here:",
                record.name,
                record.role.as_str()
            );
            // Alone on the last line, so that scripts can take it with `tail -n 1`.
            println!("{}", token.secret());
        }
        TokenCommand::List => {
            let tokens = catalog.tokens().await?;
            println!("{:<32} {:<6} {:<24}", "name", "role", "created_at");
            for t in tokens {
                println!("{:<32} {:<6} {:<24}", t.name, t.role.as_str(), t.created_at);
            }
        }
        TokenCommand::Revoke { name } => {
            let record = catalog.revoke_token(&name).await?;
            println!("revoked token '{}'", record.name);
        }
    }
    Ok(())
}
